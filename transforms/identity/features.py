"""Comparison columns for matching: folded names, nickname groups, Soundex keys, birth-date parts,
the SSN or other national id, digits-only phone, a canonical street line, ZIP5.

Invariant: ``features`` returns its input row for row, in order, with ``FEATURE_COLUMNS`` added
(``sex``, ``ssn``, ``phone`` and ``email`` replaced by their normalized forms); a value that cannot
be a real one (SSN 000-.., a 7-digit phone, sex 'unknown', an id of one repeated digit) becomes
null, so it is missing evidence rather than agreeing evidence. ``FEATURE_SOURCES`` names the input
column each feature comes from, so anything said about a feature can name what the user supplied.
"""

from typing import Final

import polars as pl

from transforms.identity.nicknames import FORMAL_NAMES, VARIANTS


def _letters(expr: pl.Expr) -> pl.Expr:
    # NFKD then dropping non-ASCII strips accents (José -> jose) without a transliteration library.
    return (
        expr.str.normalize("NFKD")
        .str.replace_all(r"[^\x00-\x7F]", "")
        .str.to_lowercase()
        .str.replace_all(r"['`.]", "")
        .str.replace_all(r"[^a-z]+", " ")
        .str.strip_chars()
        .replace("", None)
    )


_SOUNDEX_CLASSES: Final = (
    ("[bfpv]", "1"),
    ("[cgjkqsxz]", "2"),
    ("[dt]", "3"),
    ("l", "4"),
    ("[mn]", "5"),
    ("r", "6"),
    ("[aeiouy]", "0"),
)


def _soundex(name: pl.Expr) -> pl.Expr:
    """American Soundex (h and w transparent), as a blocking key tolerant of spelling variants."""
    s = name.str.replace_all("[^a-z]", "").str.replace_all("[hw]", "")
    for pattern, digit in _SOUNDEX_CLASSES:
        s = s.str.replace_all(pattern, digit)
    # The regex engine has no back-references, so runs of each digit are collapsed one by one.
    for digit in "0123456":
        s = s.str.replace_all(f"{digit}+", digit)
    rest = s.str.slice(1).str.replace_all("0", "")
    first = name.str.replace_all("[^a-z]", "").str.slice(0, 1)
    return pl.when(first == "").then(None).otherwise((first + rest + "000").str.slice(0, 4))


_STREET_WORDS: Final = {
    "street": "st",
    "avenue": "ave",
    "av": "ave",
    "road": "rd",
    "drive": "dr",
    "lane": "ln",
    "boulevard": "blvd",
    "court": "ct",
    "place": "pl",
    "terrace": "ter",
    "circle": "cir",
    "highway": "hwy",
    "parkway": "pkwy",
    "square": "sq",
    "apartment": "apt",
    "suite": "ste",
    "unit": "apt",
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
}

_NAME_PARTICLES: Final = (
    "de",
    "del",
    "der",
    "da",
    "di",
    "du",
    "la",
    "le",
    "van",
    "von",
    "st",
    "mc",
    "jr",
    "sr",
)

_NICKNAME_FRAME: Final = pl.DataFrame(
    {
        "given_first": list(FORMAL_NAMES.keys()),
        "formal": [list(v) for v in FORMAL_NAMES.values()],
        "given_variants": [list(VARIANTS[k]) for k in FORMAL_NAMES],
    },
    schema={
        "given_first": pl.String(),
        "formal": pl.List(pl.String()),
        "given_variants": pl.List(pl.String()),
    },
)

#: Columns ``features`` adds; Splink sees only these (plus ``rid``).
FEATURE_COLUMNS: Final = (
    "given",
    "given_formal",
    "given_variants",
    "given_sx",
    "middle",
    "family",
    "family_tokens",
    "family_sx",
    "dob",
    "dob_y",
    "dob_m",
    "dob_d",
    "dob_key",
    "sex",
    "ssn",
    "addr",
    "zip5",
    "phone",
    "email",
)

#: The input (``patients``) column each feature is computed from.
FEATURE_SOURCES: Final[dict[str, str]] = {
    **dict.fromkeys(("given", "given_formal", "given_variants", "given_sx"), "given_name"),
    "middle": "middle_name",
    **dict.fromkeys(("family", "family_tokens", "family_sx"), "family_name"),
    **dict.fromkeys(("dob", "dob_y", "dob_m", "dob_d", "dob_key"), "birth_date"),
    "sex": "sex",
    "ssn": "ssn",
    "addr": "address_line",
    "zip5": "address_postal_code",
    "phone": "phone",
    "email": "email",
}


def _national_id(raw: pl.Expr) -> pl.Expr:
    """The ``ssn`` column as one identifier: a US SSN as its 9 digits (never-issued and placeholder
    numbers -> null), anything else as an exact national id (uppercase letters and digits).

    Outside lists carry other countries' ids in this column (7- or 8-digit numbers, letters and
    digits); discarding them would throw away a list's strongest evidence. An id with no digit
    (``UNKNOWN``), of one repeated character or counting up from 1 is a placeholder, not an id.
    """
    compact = raw.str.to_uppercase().str.replace_all(r"[\s\-./]", "")
    ssn = pl.when(~compact.str.contains(r"^(000|666)|^\d{3}00|0000$|^123456789$")).then(compact)
    other = compact.str.replace_all(r"[^0-9A-Z]", "")
    placeholder = (
        ~other.str.contains(r"\d")
        | (other.str.strip_chars(other.str.slice(0, 1)) == "")
        | pl.lit("12345678901234567890").str.starts_with(other)
    )
    return (
        pl.when(compact.str.contains(r"^\d{9}$"))
        .then(ssn)
        .when(other.str.len_chars().is_between(5, 20) & ~placeholder)
        .then(other)
        .otherwise(None)
    )


def _given_features(given_name: pl.LazyFrame) -> pl.LazyFrame:
    full = _letters(pl.col("given_name"))
    return (
        given_name.with_columns(
            given=full.str.replace_all(" ", ""), given_first=full.str.split(" ").list.first()
        )
        .join(_NICKNAME_FRAME.lazy(), on="given_first", how="left")
        .with_columns(
            # The full given name stands for itself; a nickname also stands for its formal names.
            given_formal=pl.concat_list(pl.col("given"), pl.col("formal").fill_null([]))
            .list.drop_nulls()
            .list.unique()
            .list.sort(),
            # Blocking key: the first formal name a nickname stands for (Bob and Robert block together).
            given_sx=_soundex(pl.coalesce(pl.col("formal").list.first(), pl.col("given_first"))),
        )
        .select("given_name", "given", "given_formal", "given_variants", "given_sx")
    )


def _family_features(family_name: pl.LazyFrame) -> pl.LazyFrame:
    full = _letters(pl.col("family_name"))
    tokens = full.str.split(" ")
    return family_name.with_columns(
        family=full.str.replace_all(" ", ""),
        # Hyphenated and compound names as a set of significant words, so "Smith-Jones" and "Smith"
        # share one; particles (de, van, st) are not significant.
        family_tokens=tokens.list.eval(
            pl.element().filter((pl.element().str.len_chars() >= 2) & ~pl.element().is_in(_NAME_PARTICLES))
        )
        .list.unique()
        .list.sort(),
        family_sx=_soundex(tokens.list.first()),
    )


def features(patients: pl.LazyFrame) -> pl.LazyFrame:
    """The comparison columns for matching: names folded to ASCII letters, nickname groups,
    Soundex keys, birth-date parts, the SSN or national id, digits-only phone, a canonical street
    line and ZIP5."""
    addr = (
        pl.col("address_line")
        .str.normalize("NFKD")
        .str.replace_all(r"[^\x00-\x7F]", "")
        .str.to_lowercase()
        .str.replace_all(r"#", " apt ")
        .str.replace_all(r"[.,']", "")
        .str.replace_all(r"[^a-z0-9]+", " ")
        .str.strip_chars()
    )
    addr_tokens = addr.str.split(" ").list.eval(pl.element().replace(_STREET_WORDS))
    phone = pl.col("phone").str.replace_all(r"\D", "").str.slice(-10)
    dob = pl.col("birth_date")
    sex = pl.col("sex").str.to_lowercase().str.strip_chars()
    # Names repeat a lot (a million records hold a few thousand distinct names): derive name
    # features once per distinct value and join them back.
    given = _given_features(patients.select("given_name").unique())
    family = _family_features(patients.select("family_name").unique())
    frame = (
        patients.join(given, on="given_name", how="left", nulls_equal=True, maintain_order="left")
        .join(family, on="family_name", how="left", nulls_equal=True, maintain_order="left")
        .with_columns(
            middle=_letters(pl.col("middle_name")).str.replace_all(" ", ""),
            dob=dob.dt.to_string("%Y-%m-%d"),
            dob_y=dob.dt.year().cast(pl.Int32),
            dob_m=dob.dt.month().cast(pl.Int32),
            dob_d=dob.dt.day().cast(pl.Int32),
            sex=pl.when(sex.is_in(["male", "female", "other"])).then(sex).otherwise(None),
            ssn=_national_id(pl.col("ssn")),
            addr=addr_tokens.list.join(" ").replace("", None),
            zip5=pl.col("address_postal_code").str.replace_all(r"\D", "").str.slice(0, 5).replace("", None),
            phone=pl.when(phone.str.len_chars() == 10).then(phone).otherwise(None),
            email=pl.col("email").str.strip_chars().str.to_lowercase().replace("", None),
        )
    )
    return frame.with_columns(
        # Day and month in either order, so a transposed birth date still blocks with the original.
        dob_key=pl.when(pl.col("dob_y").is_not_null()).then(
            pl.format(
                "{}-{}-{}",
                pl.col("dob_y"),
                pl.min_horizontal("dob_m", "dob_d"),
                pl.max_horizontal("dob_m", "dob_d"),
            )
        ),
    )
