"""Typed errors of silorec: each tells a person where the fault is and what to do."""

from __future__ import annotations

from pathlib import Path


class SilorecError(Exception):
    """Base of every error silorec raises on purpose; command-line tools print it as one line."""


class SiloFormatError(SilorecError):
    """A silo's files are missing or malformed.

    `location` is "line N" for text files and "row N" for Parquet (both 1-based,
    counting the header as line 1 of a text file).
    """

    def __init__(
        self,
        path: Path | str,
        problem: str,
        *,
        location: str | None = None,
        field: str | None = None,
        hint: str = "",
    ) -> None:
        self.path = Path(path)
        self.location = location
        self.field = field
        self.problem = problem
        self.hint = hint
        where = str(self.path) + (f", {location}" if location else "")
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}" + (f" — {hint}" if hint else ""))


class MissingFileError(SiloFormatError):
    """A required silo file (interactions or items) is absent."""


class MissingColumnError(SiloFormatError):
    """A required column is absent from a silo file's header."""


class BadTimestampError(SiloFormatError):
    """A timestamp that is neither an integer epoch nor an ISO 8601 date-time."""


class EmptyFieldError(SiloFormatError):
    """A required value (an id, a title) is empty."""


class UnknownItemError(SiloFormatError):
    """An interaction names an item that the catalog does not have."""


class DuplicateItemError(SiloFormatError):
    """The catalog lists the same item id twice."""


class EmptyLogError(SiloFormatError):
    """The interaction log has no interactions."""


class SecureAggregationError(SilorecError):
    """A secure sum cannot go on as announced for this merchant (its budget, its model, the lattice, too few others)."""


class DataFetchError(SilorecError):
    """A demo data set could not be fetched or failed its checksum."""


class PartitionError(SilorecError):
    """A silo cannot be partitioned as asked."""
