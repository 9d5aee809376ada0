"""The package version, in one place (imported by the CLI, provenance entries and the build)."""

__version__ = "0.1.0"
