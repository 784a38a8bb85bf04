"""Present the claims table (``jdoptim.aggregation._claims``) on the generated pages.

The claims table is the single statement of what each aggregation method is and guarantees; the
property tests check the same records. This module only formats them as reStructuredText.
"""

from __future__ import annotations

import re

import tex_literals

# (field of Claims, column title, phrase on a method's page)
FLAGS = [
    ("non_conflicting", "Non-conflicting", "non-conflicting (:math:`J\\,\\mathcal A(J) \\ge 0`)"),
    (
        "homogeneous",
        "Homogeneous",
        "positively homogeneous (:math:`\\mathcal A(sJ) = s\\,\\mathcal A(J)`)",
    ),
    ("permutation_invariant", "Perm. invariant", "permutation invariant"),
    ("linear", "Linear", "linear"),
    ("stateless", "Stateless", "stateless"),
    ("deterministic", "Deterministic", "deterministic"),
]
YES, NO = "✓", "–"


def plain(text: str) -> str:
    """Claims text as reST: markup characters escaped, except inside ````code```` spans."""
    pieces = re.split(r"(``.+?``)", text)
    for i in range(0, len(pieces), 2):
        pieces[i] = re.sub(r"([\\*`|_])", r"\\\1", pieces[i])
    return tex_literals.convert("".join(pieces))


def slug(claims) -> str:
    """The page name of a method: its name in lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", claims.name.lower())


def paper(claims) -> str:
    p = claims.paper
    if p is None:
        return "none (a baseline)"
    authors = plain(", ".join(p.authors))
    return f"*{plain(p.title)}*, {authors}. {plain(p.venue)}, {p.year}. `{p.url} <{p.url}>`__"


def cost(claims) -> str:
    if claims.gramian_only:
        return (
            "Gramian only: the weights need only :math:`G = J J^\\top`, so the per-sample and "
            "layer-Gramian engines apply (:doc:`/performance`)"
        )
    return "needs :math:`J` itself: the optimizer always uses the Jacobian engine"


def hyper_parameters(claims) -> list[str]:
    """One bullet per constructor argument: ``name=default``: meaning."""
    return [
        f"``{h.name}`` (required): {plain(h.meaning)}"
        if h.default == "(required)"
        else f"``{h.name}={h.default}``: {plain(h.meaning)}"
        for h in claims.hyperparameters
    ] or ["none"]


def properties(claims) -> str:
    has = [phrase for field, _, phrase in FLAGS if getattr(claims, field)]
    lacks = [
        re.sub(r" \(.*", "", phrase) for field, _, phrase in FLAGS if not getattr(claims, field)
    ]
    text = "Yes: " + (", ".join(has) or "none") + ". No: " + (", ".join(lacks) or "none") + "."
    if claims.conditions:
        text += f" Conditions: {plain(claims.conditions)}."
    return text


def rows(claims) -> list[tuple[str, str | list[str]]]:
    """The ``(field, text or bullets)`` rows of one method's page."""
    return [
        ("Summary", plain(claims.summary)),
        ("Paper", paper(claims)),
        ("Cost", cost(claims)),
        ("Hyper-parameters", hyper_parameters(claims)),
        ("Properties", properties(claims)),
    ]


def table_columns() -> list[str]:
    return [title for _, title, _ in FLAGS if title != "Linear"]


def table_cells(claims) -> list[str]:
    return [YES if getattr(claims, f) else NO for f, title, _ in FLAGS if title != "Linear"]
