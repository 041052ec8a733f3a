"""The diagnostic classes, their text descriptions and the class-name matching rules.

Classes are always identified by name, never by label index: the high-risk screen and the
mapping of a center's folders to classes both go through the names defined here.
"""

from __future__ import annotations

import difflib
import re
import shlex
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


# Folder spellings clinicians use for the default classes (folder name -> class), matched by
# normalised name like every class folder. A configured class of the same name, or a user alias
# (data.class_aliases), takes precedence; aliases to a class that is not configured are unused.
BUILTIN_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ("HSIL", "high-grade lesion", "high-grade SIL", "CIN2", "CIN2+", "CIN3", "CIN2-3"),
        "high-grade_squamous_intraepithelial_lesion",
    ),
    **dict.fromkeys(
        ("carcinoma", "cervical cancer", "SCC", "squamous cell carcinoma", "adenocarcinoma"), "cancer"
    ),
    **dict.fromkeys(("inflammation", "cervicitis", "chronic cervicitis"), "mild_inflammation"),
    **dict.fromkeys(("cervical ectropion", "ectopy", "cervical ectopy"), "ectropion"),
    **dict.fromkeys(("nabothian cyst", "nabothian cysts", "cysts"), "cyst"),
}

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


def alias_syntax(folder: str, target: str) -> str:
    """The two ways to map `folder` onto class `target`: the --set flag and the YAML config."""
    yaml_form = f"data: {{class_aliases: {{{_yaml_key(folder)}: {target}}}}}"
    if "." in folder or "=" in folder:  # a dotted key or '=' cannot be written with --set
        return f"in the YAML config: {yaml_form}"
    return f"--set {shlex.quote(f'data.class_aliases.{folder}={target}')} or in the YAML config: {yaml_form}"


def _yaml_key(text: str) -> str:
    plain = re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_ +\-]*", text) and text == text.strip()
    return text if plain else f'"{text}"'


@dataclass(frozen=True)
class ClassMap:
    """Maps folder names to the configured classes: by normalised name, then by the user's aliases
    (``data.class_aliases``, folder -> class), then by the built-in aliases (``BUILTIN_ALIASES``)."""

    names: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    builtin: bool = True

    def __post_init__(self) -> None:
        first: dict[str, str] = {}
        for name in self.names:
            other = first.setdefault(normalise_class_name(name), name)
            if other != name:
                raise SavltError(
                    f"data.classes: {other!r} and {name!r} are the same folder name once case, spaces, "
                    "'-' and '_' are ignored: rename one of them"
                )
        by_key = {normalise_class_name(n): n for n in self.names}
        seen: dict[str, tuple[str, str]] = {}
        for alias, target in self.aliases:
            where = f"data.class_aliases.{alias}"
            resolved = by_key.get(normalise_class_name(str(target)))
            if resolved is None:
                backwards = by_key.get(normalise_class_name(alias))
                if backwards is not None:
                    raise SavltError(
                        f"{where}: the alias is written the wrong way round ({alias}: {target}); aliases map "
                        f"FOLDER: CLASS, so write {alias_syntax(str(target), backwards)}"
                    )
                raise SavltError(
                    f"{where}: {target!r} is not a configured class (known: {', '.join(self.names)}); "
                    "aliases map FOLDER: CLASS"
                )
            claimed = by_key.get(normalise_class_name(alias))
            if claimed is not None and claimed != resolved:
                raise SavltError(
                    f"{where}: {alias!r} is already the name of class {claimed!r}; "
                    "an alias cannot send a class folder to another class"
                )
            key = normalise_class_name(alias)
            earlier = seen.setdefault(key, (alias, resolved))
            if earlier[1] != resolved:
                raise SavltError(
                    f"data.class_aliases: {earlier[0]!r} and {alias!r} are the same folder name once case, "
                    f"spaces, '-' and '_' are ignored, but map to {earlier[1]!r} and {resolved!r}"
                )

    def _lookup(self) -> dict[str, str]:
        table: dict[str, str] = {}
        if self.builtin:
            table.update({normalise_class_name(a): t for a, t in BUILTIN_ALIASES.items() if t in self.names})
        by_key = {normalise_class_name(n): n for n in self.names}
        table.update({normalise_class_name(a): by_key[normalise_class_name(t)] for a, t in self.aliases})
        table.update(by_key)
        return table

    def knows(self, folder: str) -> bool:
        """Whether `folder` names a configured class (directly or through an alias)."""
        return normalise_class_name(folder) in self._lookup()

    def resolve(self, folder: str, where: str = "") -> str:
        """Canonical class name for a folder name; UnknownClassError names the folder, the known
        classes and the exact setting that maps it."""
        found = self._lookup().get(normalise_class_name(folder))
        if found is None:
            place = f" in {where}" if where else ""
            guess = difflib.get_close_matches(
                normalise_class_name(folder), [normalise_class_name(n) for n in self.names], n=1, cutoff=0.6
            )
            target = next((n for n in self.names if guess and normalise_class_name(n) == guess[0]), "CLASS")
            raise UnknownClassError(
                f"unknown class folder {folder!r}{place}; known classes: {', '.join(self.names)}; "
                f"map it with {alias_syntax(folder, target)}"
            )
        return found

    def index(self, name: str) -> int:
        return self.names.index(name)
