"""`cot-compress hub ...`: the local Hub-compatible server."""

from __future__ import annotations

from pathlib import Path

import click


def parse_users(values: tuple[str, ...]) -> dict[str, str]:
    """``("alice:hf_a", "bob:hf_b")`` -> ``{"alice": "hf_a", "bob": "hf_b"}``, order kept (first = default)."""
    users: dict[str, str] = {}
    for value in values:
        name, sep, token = value.partition(":")
        if not sep or not name or not token:
            raise click.BadParameter(f"expected NAME:TOKEN, got {value!r}", param_hint="--user")
        if name in users:
            raise click.BadParameter(f"user {name!r} is given twice", param_hint="--user")
        users[name] = token
    return users


@click.group()
def hub() -> None:
    """The local Hub-compatible server."""


@hub.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on."
)
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Data directory (created if missing; kept across restarts).",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="NAME:TOKEN",
    help="An account and its token; repeat for more. The first is the default namespace.",
)
@click.option(
    "--read-only-user",
    "read_only_users",
    multiple=True,
    metavar="NAME:TOKEN",
    help="An account whose token can read but not write.",
)
def serve(
    host: str, port: int, data_dir: Path, users: tuple[str, ...], read_only_users: tuple[str, ...]
) -> None:
    """Run the local Hub-compatible server in the foreground (Ctrl-C stops it)."""
    from hub_tools.local_hub import DEFAULT_USERS, serve_forever

    accounts = parse_users(users) or dict(DEFAULT_USERS)
    read_only = parse_users(read_only_users)
    accounts.update(read_only)
    first = next(iter(accounts))
    click.echo(f"local hub on http://{host}:{port} (data: {data_dir}); default user {first!r}")
    click.echo(
        f"clients: export HF_ENDPOINT=http://{host}:{port} HF_HUB_DISABLE_XET=1 HF_TOKEN=<token of {first}>"
    )
    serve_forever(data_dir, host=host, port=port, users=accounts, read_only_tokens=set(read_only.values()))
