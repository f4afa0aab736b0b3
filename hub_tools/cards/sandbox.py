"""The card templates: loaded into an immutable Jinja sandbox, every failure one ``TemplateError`` line."""

from __future__ import annotations

import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from eval_artifacts.study.errors import TemplateError
from hub_tools.cards.format import code_block, code_span, md_inline, plain_text

ADAPTER_TEMPLATE = "adapter_card.md.j2"
DATASET_TEMPLATE = "eval_dataset_card.md.j2"
NOTE_TEMPLATE = "collection_note.txt.j2"
BASE_TEMPLATE = "base_card.md.j2"
"""The tiny study's base model card (the tiny study publishes its base as ``{prefix}-base``)."""
TEMPLATES = (ADAPTER_TEMPLATE, DATASET_TEMPLATE, NOTE_TEMPLATE, BASE_TEMPLATE)


def default_templates_dir() -> Path:
    return Path(str(resources.files("cards_templates")))


def make_environment(templates_dir: Path | None = None) -> jinja2.Environment:
    """An immutable sandbox with StrictUndefined; every template must exist in ``templates_dir``.

    Raises:
        TemplateError: the directory lacks one of ``TEMPLATES`` (named).
    """
    directory = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    for name in TEMPLATES:
        if not (directory / name).is_file():
            raise TemplateError(
                f"template {name} is missing from {directory}: copy it from cards_templates/ in cot-compress and edit it"
            )
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # markdown, not HTML: free text goes through the explicit `md` filter instead
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md_inline, code=code_span, code_block=code_block, plain=plain_text, py=repr)
    return env


def _template_line(error: BaseException, filename: str | None) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if filename and f.filename == filename]
    return f" line {frames[-1].lineno}" if frames else ""


def render_template(env: jinja2.Environment, name: str, context: dict[str, Any]) -> str:
    """Render one template; every failure is a one-line ``TemplateError`` naming the template (and line).

    Raises:
        TemplateError: syntax error, undefined (misspelled) variable, or an attempt to leave the sandbox.
    """
    try:
        template = env.get_template(name)
    except TemplateNotFound:
        raise TemplateError(
            f"template {name} not found: pass --templates with a folder that holds it"
        ) from None
    except TemplateSyntaxError as error:
        raise TemplateError(f"template {name} line {error.lineno}: syntax error: {error.message}") from None
    try:
        return template.render(context)
    except (SecurityError, OverflowError) as error:  # OverflowError: the sandbox's range() limit
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where} was refused by the sandbox ({error}): templates may only read the card variables"
        ) from None
    except TemplateNotFound as error:  # {% include %} / {% extends %} of a path outside the templates folder
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where} includes {error.name!r}, which is not a template of its folder: "
            "templates may only include templates beside them"
        ) from None
    except UndefinedError as error:
        where = name + _template_line(error, template.filename)
        raise TemplateError(
            f"template {where}: undefined variable: {error.message}; "
            f"the top-level variables are {', '.join(sorted(context))}"
        ) from None
    except TemplateSyntaxError as error:  # in a template it includes (parsed only when reached)
        raise TemplateError(
            f"template {error.name or name} (included by {name}) line {error.lineno}: syntax error: {error.message}"
        ) from None
    except RecursionError:
        raise TemplateError(
            f"template {name} includes itself, directly or through another template: remove the loop"
        ) from None
