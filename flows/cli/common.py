"""What every `fewtune` command shares: the console it prints to, the user-error exit code, value formatting and
the training-health lines (printed by `fewtune run` and `fewtune health`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

console = Console()
EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3


def print_user_error(exc: BaseException | str, label: str = "error") -> None:
    """A user error as one message: `label:` in red, then the error's text exactly as written. The text is never read
    as rich markup (a path or a `--set 'key=[a, b]'` hint holds brackets) nor re-wrapped at the terminal's width, so
    a command in it can be copied as printed."""
    console.print(Text.assemble((f"{label}:", "bold red"), " ", str(exc)), soft_wrap=True, highlight=False)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def print_health(report: dict[str, Any] | None) -> None:
    """The training-health verdict, and each warning sign with what to change."""
    if not report:
        return
    from tasks.health import health_lines

    first, *rest = health_lines(report)
    colour = "green" if report["healthy"] else "yellow"
    console.print(f"health:    [{colour}]{escape(first)}[/{colour}]", highlight=False)
    for line in rest:
        console.print(f"  {line}", markup=False, highlight=False)
