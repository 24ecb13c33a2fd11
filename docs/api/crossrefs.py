"""griffe extension: turn the Hugging Face docstring references of regtune (``[`Name`]``, ``[`module.Name`]``) into
mkdocstrings cross-references (``[`Name`][regtune.path.Name]``), so that the API reference links them, and so that a
reference to nothing is an unresolved cross-reference, which fails `mkdocs build --strict`."""

from __future__ import annotations

import re

import griffe


# [`Name`] (or [`~module.Name`], shown as `Name`) not already followed by a link target `(...)` or `[...]`
HF_REFERENCE = re.compile(r"\[`(?P<tilde>~)?(?P<name>[A-Za-z_][A-Za-z0-9_.]*)`\](?![\[(])")


class HFCrossReferences(griffe.Extension):
    """Resolve every ``[`Name`]`` of the package's docstrings to the path of the object it names."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != "regtune":
            return
        index: dict[str, list[str]] = {}
        objects = list(_walk(pkg))
        for obj in objects:
            index.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = HF_REFERENCE.sub(lambda m: _link(m, obj, index), obj.docstring.value)


def _walk(obj, seen=None):
    seen = set() if seen is None else seen
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if member.is_alias:  # a re-export: the object itself is walked where it is defined
            continue
        yield from _walk(member, seen)


def _link(match: re.Match, context, index: dict[str, list[str]]) -> str:
    name = match.group("name")
    shown = name.rsplit(".", 1)[-1] if match.group("tilde") else name
    if name.startswith("regtune."):
        target = name
    else:
        head, _, rest = name.partition(".")
        candidates = index.get(head, [])
        # the nearest definition: one in the referring object's own module, else the shortest path
        module = context.module.path if hasattr(context, "module") else ""
        local = [path for path in candidates if path.startswith(module + ".")]
        chosen = (local or sorted(candidates, key=len) or [None])[0]
        if chosen is None:  # unresolved: autorefs reports the (dotted) target, and the strict build fails
            return f"[`{shown}`][{module}.{name}]"
        target = chosen + (f".{rest}" if rest else "")
    return f"[`{shown}`][{target}]"
