"""Label names discovered from data, shared by every classification data module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ptft.core.errors import PtftError


def _is_int_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def discover_label_names(values: Iterable[Any], names: Sequence[str] | None = None, source: str = "train") -> list[str]:
    """Label names in id order for the labels seen in training data.

    Integer labels are ids: ``0..max`` (names ``"0"``, ``"1"``, … unless ``names`` are given). Other labels are
    names: sorted unless ``names`` fixes the order.

    Args:
        values: The label column of the training data.
        names: Label names given by the user, in id order.
        source: Where the labels come from, for error messages.
    """
    seen = set(values)
    if not seen:
        raise PtftError(f"no labels found in {source}")
    if None in seen:
        raise PtftError(f"{source} has empty labels; fill them in or drop those rows")
    if all(_is_int_label(v) for v in seen):
        if min(seen) < 0:
            raise PtftError(f"{source} has negative label id {min(seen)}; integer labels must be 0..num_labels-1")
        count = max(seen) + 1
        if names is not None:
            if max(seen) >= len(names):
                raise PtftError(
                    f"{source} has label id {max(seen)} but only {len(names)} label names were given: {list(names)}"
                )
            return list(names)
        return [str(i) for i in range(count)]
    as_str = {str(v) for v in seen}
    if names is not None:
        unknown = sorted(as_str - set(names))
        if unknown:
            raise PtftError(f"{source} has labels {unknown} that are not in the given label names {list(names)}")
        return list(names)
    return sorted(as_str)


def encode_labels(values: Sequence[Any], names: Sequence[str], source: str) -> list[int]:
    """Label ids for ``values`` (ids or names); one-line error for labels never seen in training."""
    index = {name: i for i, name in enumerate(names)}
    ids: list[int] = []
    unknown: set[str] = set()
    for v in values:
        if _is_int_label(v):
            if 0 <= v < len(names):
                ids.append(v)
                continue
        elif v is not None and str(v) in index:
            ids.append(index[str(v)])
            continue
        unknown.add(str(v))
    if unknown:
        shown = sorted(unknown)[:5]
        raise PtftError(
            f"{source} has labels never seen in training: {shown}{' …' if len(unknown) > 5 else ''} "
            f"(known: {list(names)[:10]}{' …' if len(names) > 10 else ''})"
        )
    return ids


def split_label_names(labels: dict[str, Sequence[Any] | None], given: Sequence[str] | None, what: str) -> list[str]:
    """Label names in id order from each split's labels (``train``, ``val``, ``test``; ``None`` for a split not
    given): :func:`discover_label_names` of the training labels, or ``given`` when there is no training data;
    validation and test labels must be among them (one-line error otherwise). ``what`` names the rows (``clips``)."""
    if labels.get("train") is None:
        if given is None:
            raise PtftError(f"without training {what}, give the label names: data.init_args.labels=[...]")
        return list(given)
    names = discover_label_names(labels["train"], given, "train")
    for split in ("val", "test"):
        if labels.get(split) is not None:
            encode_labels(labels[split], names, split)
    return names
