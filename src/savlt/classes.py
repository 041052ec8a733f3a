"""The diagnostic classes, their text descriptions and the class-name matching rules.

Classes are always identified by name, never by label index: the high-risk screen and the
mapping of a center's folders to classes both go through the names defined here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from savlt.errors import SavltError

# Canonical class folder names, in label order, with the descriptions of the published method.
DEFAULT_CLASSES: dict[str, str] = {
    "mild_inflammation": "Medical OCT image showing distinct layered structures with gray-white upper and lower layers",
    "cyst": "Medical OCT image with smooth curved layered structures and oval dark areas",
    "ectropion": "Medical OCT image displaying continuous papillary protrusions from columnar epithelium in upper region",
    "high-grade_squamous_intraepithelial_lesion": "Medical OCT image showing densely packed icicle-like structures",
    "cancer": "Medical OCT image revealing irregular tumor nests and necrotic dark areas",
}

# Positive classes of the binary high-risk screen (HSIL and cancer), by name.
DEFAULT_HIGH_RISK: tuple[str, ...] = ("high-grade_squamous_intraepithelial_lesion", "cancer")


# Compact labels for tables, plots and synthetic file names; other classes keep their own name.
SHORT_NAMES: dict[str, str] = {
    "high-grade_squamous_intraepithelial_lesion": "HSIL",
    "mild_inflammation": "inflammation",
}


def short_name(name: str) -> str:
    """A compact label for tables and plots."""
    return SHORT_NAMES.get(name, name)


def normalise_class_name(name: str) -> str:
    """Folder-name key used for matching: case, spaces, '-' and '_' do not matter."""
    return re.sub(r"[\s\-_]+", "", name.strip().lower())


class UnknownClassError(SavltError):
    """A class folder that matches no configured class or alias."""


@dataclass(frozen=True)
class ClassMap:
    """Maps folder names to the configured classes (by normalised name, then by alias)."""

    names: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        keys = [normalise_class_name(n) for n in self.names]
        if len(set(keys)) != len(keys):
            raise SavltError(f"class names collide after normalisation: {list(self.names)}")
        for alias, target in self.aliases:
            if target not in self.names:
                raise SavltError(
                    f"class alias {alias!r} points to {target!r}, which is not a configured class "
                    f"(known: {', '.join(self.names)})"
                )

    def _lookup(self) -> dict[str, str]:
        table = {normalise_class_name(n): n for n in self.names}
        table.update({normalise_class_name(a): t for a, t in self.aliases})
        return table

    def resolve(self, folder: str, where: str = "") -> str:
        """Canonical class name for a folder name; UnknownClassError names folder and known classes."""
        found = self._lookup().get(normalise_class_name(folder))
        if found is None:
            place = f" in {where}" if where else ""
            raise UnknownClassError(
                f"unknown class folder {folder!r}{place}; known classes: {', '.join(self.names)}"
                " (add an alias under data.class_aliases to map it)"
            )
        return found

    def index(self, name: str) -> int:
        return self.names.index(name)
