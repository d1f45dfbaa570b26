"""Text and numbers the API accepts, declared so that the OpenAPI spec and the validation agree.

* Text is valid Unicode end to end. A lone UTF-16 surrogate (JSON ``"\\ud800"``) parses into a
  Python ``str`` but cannot be encoded as UTF-8, so the tokenizer would raise deep inside a batch;
  it is refused at the boundary with a 422 naming the field.
* "Not blank" is an explicit character class, so the JSON Schema regex (ECMA-262), pydantic's
  regex engine and the fuzzers' generators all mean the same thing by it.
* Integers are JSON Schema's: 11 and 11.0 are the same number; "11" (a string) and true are not.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, StrictInt, StrictStr, StringConstraints, Tag

NOT_BLANK = r"[^ \t\r\n]"  # a character other than space, tab, CR, LF


def utf8_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {exc.start})") from None
    return value


def _utf8_if_text(value):
    return utf8_text(value) if isinstance(value, str) else value


def _whole_float_to_int(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[StrictStr, AfterValidator(utf8_text)]  # strict: a number is not text
LaxText = Annotated[str, AfterValidator(utf8_text)]
Integer = Annotated[StrictInt, BeforeValidator(_whole_float_to_int)]


def integer(**bounds):
    """``Integer`` with bounds (``ge``, ``le``) that show in the JSON Schema also inside a union."""
    return Annotated[StrictInt, Field(**bounds), BeforeValidator(_whole_float_to_int)]


def query_text(max_chars: int | None = None):
    """Text that is not blank and at most ``max_chars`` characters: declared in the JSON Schema
    (minLength, maxLength, pattern) and enforced by the same constraints."""
    return Annotated[StrictStr, StringConstraints(min_length=1, max_length=max_chars, pattern=NOT_BLANK),
                     BeforeValidator(_utf8_if_text)]  # before: the pattern engine cannot read a surrogate


def one_or_many(item, max_items: int | None = None):
    """``item`` or a non-empty list of at most ``max_items`` of them (OpenAI's ``input``): oneOf in
    the JSON Schema; a validation error names the branch the value took ("text" or "texts")."""
    many = Annotated[list[item], Field(min_length=1, max_length=max_items)]
    return Annotated[Annotated[item, Tag("text")] | Annotated[many, Tag("texts")],
                     Discriminator(lambda v: "texts" if isinstance(v, list) else "text")]
