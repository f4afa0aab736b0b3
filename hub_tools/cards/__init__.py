"""Cards: every adapter card, the eval dataset card and the collection notes, rendered and validated."""

from hub_tools.cards.context import (
    EXAMPLE_QUESTION,
    PLOT_FILE,
    PUBLIC_HUB,
    SAMPLE_COLUMN_DOCS,
    SUMMARY_COLUMN_DOCS,
    hub_url,
)
from hub_tools.cards.format import (
    code_block,
    code_span,
    fmt_accuracy,
    fmt_ci,
    fmt_delta,
    fmt_median,
    fmt_p,
    fmt_tokens,
    md_inline,
)
from hub_tools.cards.render import RenderedCard, render_collection_notes, render_study_cards, write_cards
from hub_tools.cards.sandbox import (
    ADAPTER_TEMPLATE,
    DATASET_TEMPLATE,
    NOTE_TEMPLATE,
    TEMPLATES,
    default_templates_dir,
)
from hub_tools.cards.state import collection_url_from_state
from hub_tools.cards.validate import NOTE_MAX_CHARS, all_problems, validate_all, validate_card, validate_note

__all__ = [
    "ADAPTER_TEMPLATE",
    "DATASET_TEMPLATE",
    "EXAMPLE_QUESTION",
    "NOTE_MAX_CHARS",
    "NOTE_TEMPLATE",
    "PLOT_FILE",
    "PUBLIC_HUB",
    "SAMPLE_COLUMN_DOCS",
    "SUMMARY_COLUMN_DOCS",
    "TEMPLATES",
    "RenderedCard",
    "all_problems",
    "code_block",
    "code_span",
    "collection_url_from_state",
    "default_templates_dir",
    "fmt_accuracy",
    "fmt_ci",
    "fmt_delta",
    "fmt_median",
    "fmt_p",
    "fmt_tokens",
    "hub_url",
    "md_inline",
    "render_collection_notes",
    "render_study_cards",
    "validate_all",
    "validate_card",
    "validate_note",
    "write_cards",
]
