"""Text the API accepts: a string that is valid Unicode end to end. A lone UTF-16 surrogate
(JSON ``"\\ud800"``) parses into a Python ``str`` but cannot be encoded as UTF-8, so the tokenizer
would raise deep inside a batch; it is refused at the boundary with a 422 naming the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StrictStr


def utf8_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {exc.start})") from None
    return value


Text = Annotated[StrictStr, AfterValidator(utf8_text)]  # strict: a number is not text
LaxText = Annotated[str, AfterValidator(utf8_text)]
