"""`python -m tasks.config > docs/configuration.md` regenerates the configuration reference."""

from tasks.config import reference_markdown

print(reference_markdown(), end="")
