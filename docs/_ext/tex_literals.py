"""Render docstring code literals that hold TeX (````σ_{\\min}````) as math, not as raw TeX.

Docstrings are read in a terminal as often as on this site, so some formulas are written as
code literals with a little TeX inside. On a web page such a literal shows backslashes and
braces. This hook turns each literal that contains TeX (a ``\\command`` or a braced sub- or
superscript) into inline math when autodoc reads the docstring; literals without TeX stay code.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx

LITERAL = re.compile(r"(?<![`:])``(?!`)(.+?)(?<!`)``(?!`)", re.DOTALL)
TEX = re.compile(r"\\[A-Za-z]+|[_^]\{")
WORDS = {
    ">=": r"\ge ",
    "<=": r"\le ",
    "!=": r"\ne ",
    "ᵀ": r"^\top ",
    "‖": r"\|",
    "argmin": r"\operatorname{argmin}",
    "argmax": r"\operatorname{argmax}",
    "sqrt": r"\operatorname{sqrt}",
    "cos": r"\cos",
    "max": r"\max",
    "min": r"\min",
    "diag": r"\operatorname{diag}",
}
WORD = re.compile(
    "|".join(
        rf"(?<![\\A-Za-z_]){w}(?![A-Za-z])(?!_[A-Za-z]{{2}})"
        if w.isascii() and w.isalpha()
        else re.escape(w)
        for w in WORDS
    )
)
# Commands whose argument is text, left as written.
TEXT_COMMAND = r"\\(?:operatorname|text|mathrm|texttt|mathtt|mathsf)"
# A multi-letter identifier with underscores (``max_norm``): typeset as code inside the math.
IDENTIFIER = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?:_[A-Za-z]{2,})+(?![A-Za-z])")


def _escape_braces(tex: str) -> str:
    """Escape the braces that are set-builder braces, not TeX groups (``max{j : ...}``)."""
    out, stack = [], []
    for i, char in enumerate(tex):
        if char == "{":
            before = tex[:i].rstrip()
            group = before.endswith(("_", "^", "}")) or re.search(r"\\[A-Za-z]+$", before)
            stack.append(bool(group))
            out.append("{" if group else r"\{")
        elif char == "}":
            out.append("}" if (stack.pop() if stack else True) else r"\}")
        else:
            out.append(char)
    return "".join(out)


def to_math(code: str) -> str:
    """The TeX of a code literal: operators and Unicode marks replaced, stray braces escaped."""
    tex = _escape_braces(" ".join(code.split()))
    # Commands with their argument and identifiers are kept whole; operators are replaced
    # only between them.
    pieces = re.split(rf"({TEXT_COMMAND}\{{[^{{}}]*\}}|{IDENTIFIER.pattern})", tex)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            pieces[i] = WORD.sub(lambda m: WORDS[m.group(0)], piece)
        elif IDENTIFIER.fullmatch(piece):
            pieces[i] = r"\texttt{" + piece.replace("_", r"\_") + "}"
    return "".join(pieces)


def convert(text: str) -> str:
    """Replace every TeX-bearing code literal of ``text`` by a ``:math:`` role."""

    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if not TEX.search(code):
            return match.group(0)
        return f":math:`{to_math(code).replace('`', '')}`"

    return LITERAL.sub(replace, text)


def _process(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = convert("\n".join(lines)).split("\n")


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
