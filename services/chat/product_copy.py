# ruff: noqa: RUF001 -- localized text: long lines and full-width punctuation are intended
"""Product listing copy (title, bullet points, description) in a target language and market.

Facts (name, attributes, price, dimensions) are always placed by templates, so units and prices are
exact: imperial units for the United States, Liberia and Myanmar, metric elsewhere; numbers and money
formatted for the market's locale with Babel (CLDR data). Where the LLM writes the target language it
phrases the description from those facts; elsewhere a localized template does (no translation model
is available offline, so attribute values stay as given).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency, format_decimal

from services.runtime.errors import Violation

IMPERIAL_MARKETS = {"US", "LR", "MM"}
CM_PER_INCH = 2.54
KG_PER_LB = 0.45359237

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "material": "Material",
        "color": "Colour",
        "size": "Size",
        "fit": "Fit",
        "care": "Care",
        "origin": "Made in",
        "dimensions": "Dimensions",
        "weight": "Weight",
        "price": "Price",
        "intro": "{name}: {category} from our cross-border store.",
        "ships": "Ships to {market} with tracked delivery.",
    },
    "es": {
        "material": "Material",
        "color": "Color",
        "size": "Talla",
        "fit": "Corte",
        "care": "Cuidado",
        "origin": "Fabricado en",
        "dimensions": "Medidas",
        "weight": "Peso",
        "price": "Precio",
        "intro": "{name}: {category} de nuestra tienda internacional.",
        "ships": "Envío con seguimiento a {market}.",
    },
    "de": {
        "material": "Material",
        "color": "Farbe",
        "size": "Größe",
        "fit": "Passform",
        "care": "Pflege",
        "origin": "Hergestellt in",
        "dimensions": "Maße",
        "weight": "Gewicht",
        "price": "Preis",
        "intro": "{name}: {category} aus unserem internationalen Shop.",
        "ships": "Versand mit Sendungsverfolgung nach {market}.",
    },
    "fr": {
        "material": "Matière",
        "color": "Couleur",
        "size": "Taille",
        "fit": "Coupe",
        "care": "Entretien",
        "origin": "Fabriqué en",
        "dimensions": "Dimensions",
        "weight": "Poids",
        "price": "Prix",
        "intro": "{name} : {category} de notre boutique internationale.",
        "ships": "Livraison suivie vers {market}.",
    },
    "pt": {
        "material": "Material",
        "color": "Cor",
        "size": "Tamanho",
        "fit": "Caimento",
        "care": "Cuidados",
        "origin": "Fabricado em",
        "dimensions": "Medidas",
        "weight": "Peso",
        "price": "Preço",
        "intro": "{name}: {category} da nossa loja internacional.",
        "ships": "Entrega com rastreamento para {market}.",
    },
    "zh": {
        "material": "材质",
        "color": "颜色",
        "size": "尺码",
        "fit": "版型",
        "care": "洗护",
        "origin": "产地",
        "dimensions": "尺寸",
        "weight": "重量",
        "price": "价格",
        "intro": "{name}：来自我们跨境商店的{category}。",
        "ships": "可配送至{market}，全程物流跟踪。",
    },
    "ja": {
        "material": "素材",
        "color": "カラー",
        "size": "サイズ",
        "fit": "シルエット",
        "care": "お手入れ",
        "origin": "原産国",
        "dimensions": "寸法",
        "weight": "重量",
        "price": "価格",
        "intro": "{name}：越境ストアの{category}です。",
        "ships": "{market}へ追跡付きで配送します。",
    },
}
COLON = {"zh": "：", "ja": "："}
_CODE = re.compile(r"^[A-Za-z]{2}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# What never goes into a listing, whatever the facts or the LLM said: ANSI/VT escape sequences (CSI,
# OSC, two-character escapes), then C0/C1 controls but tab and newline, and the bidi embedding,
# override and isolate characters (U+202A-U+202E, U+2066-U+2069) that can make text read differently
# from what it says.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_copy(text: str) -> str:
    """``text`` without escape sequences, control characters or bidi overrides (see ``_UNSAFE``)."""
    return _UNSAFE.sub("", _ESCAPES.sub("", text))


@dataclass
class ProductFacts:
    name: str
    category: str
    attributes: dict[str, str]
    price: tuple[str, float] | None
    length_cm: float = 0.0
    width_cm: float = 0.0
    height_cm: float = 0.0
    weight_kg: float = 0.0


@dataclass
class Copy:
    title: str
    bullets: list[str]
    description: str
    language: str
    facts: list[str] = field(default_factory=list)


def validate_copy_request(
    facts: ProductFacts,
    language: str,
    market: str,
    price_paths: tuple[str, str] = ("product.price.currency_code", "product.price.amount"),
) -> list[Violation]:
    """What the contract (chat.proto: name 200, category 100, 50 attributes of at most 200 characters,
    no control characters; checked by the runtime) does not already say. ``price_paths``: the fields
    the price came from (currency, amount): the deprecated ``price`` or ``list_price``."""
    out = []
    if not facts.name.strip():
        out.append(Violation("product.name", "must not be empty"))
    for key in facts.attributes:
        if not key.strip() or len(key) > 50:
            out.append(Violation(f"product.attributes[{key[:50]}]", "key must be 1-50 characters"))
    if facts.price is not None:
        code, amount = facts.price
        if not _CURRENCY.match(code):
            out.append(Violation(price_paths[0], "must be an ISO 4217 code such as 'EUR'"))
        if not math.isfinite(amount) or amount < 0:
            out.append(Violation(price_paths[1], "must be a finite number >= 0"))
    for name in ("length_cm", "width_cm", "height_cm", "weight_kg"):
        value = getattr(facts, name)
        if not math.isfinite(value) or value < 0 or value > 1e6:
            out.append(Violation(f"product.{name}", "must be a finite number between 0 and 1e6"))
    if not _CODE.match(language):
        out.append(Violation("target_language", "must be an ISO 639-1 code such as 'de'"))
    if market and not _CODE.match(market):
        out.append(Violation("target_market", "must be an ISO 3166-1 alpha-2 code such as 'DE'"))
    return out


def market_locale(language: str, market: str) -> Locale:
    for tag in (f"{language}_{market}", language, "en"):
        try:
            return Locale.parse(tag)
        except (UnknownLocaleError, ValueError):
            continue
    return Locale.parse("en")


def _num(value: float, locale: Locale, digits: int = 1) -> str:
    return format_decimal(round(value, digits), format=f"#,##0.{'#' * digits}", locale=locale)


def build_template(facts: ProductFacts, language: str, market: str) -> Copy:
    """Title, bullets and a templated description; ``facts`` lists the English facts for an LLM."""
    labels = LABELS.get(language, LABELS["en"])
    colon = COLON.get(language, ": ")
    locale = market_locale(language, market)
    imperial = market in IMPERIAL_MARKETS
    bullets, english = [], []
    for key, value in facts.attributes.items():
        label = labels.get(key.lower(), key.replace("_", " ").capitalize())
        bullets.append(f"{label}{colon}{value}")
        english.append(f"{LABELS['en'].get(key.lower(), key)}: {value}")
    dims = [d for d in (facts.length_cm, facts.width_cm, facts.height_cm) if d > 0]
    if dims:
        if imperial:
            shown = " × ".join(_num(d / CM_PER_INCH, locale) for d in dims) + " in"
        else:
            shown = " × ".join(_num(d, locale) for d in dims) + " cm"
        bullets.append(f"{labels['dimensions']}{colon}{shown}")
        english.append(f"Dimensions: {shown}")
    if facts.weight_kg > 0:
        shown = (
            f"{_num(facts.weight_kg / KG_PER_LB, locale)} lb"
            if imperial
            else f"{_num(facts.weight_kg, locale, 2)} kg"
        )
        bullets.append(f"{labels['weight']}{colon}{shown}")
        english.append(f"Weight: {shown}")
    if facts.price is not None:
        shown = format_currency(facts.price[1], facts.price[0], locale=locale)
        bullets.append(f"{labels['price']}{colon}{shown}")
    color = facts.attributes.get("color") or facts.attributes.get("colour")
    title = f"{facts.name} – {color}" if color else facts.name
    market_name = Locale.parse(locale.language).territories.get(market, market) if market else ""
    category = facts.category or facts.name
    description = labels["intro"].format(name=facts.name, category=category)
    if bullets:
        description += " " + "; ".join(bullets[:4]) + ("。" if language in COLON else ".")
    if market_name:
        description += " " + labels["ships"].format(market=market_name)
    english.insert(0, f"Product: {facts.name}" + (f" ({facts.category})" if facts.category else ""))
    return Copy(
        clean_copy(title), [clean_copy(b) for b in bullets], clean_copy(description), language, english
    )


COPY_SYSTEM_PROMPT = (
    "You write short, factual product descriptions for an online store. Use only the facts given. "
    "Write two or three sentences in English. Do not mention prices."
)
