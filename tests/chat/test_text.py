# ruff: noqa: RUF001 -- multilingual test text: full-width punctuation and typographic signs are intended
"""Language id, masking, order ids, tokens, the anger heuristic and product-copy formatting (no server)."""

from __future__ import annotations

import pytest

from services.chat.product_copy import ProductFacts, build_template, validate_copy_request
from services.chat.sentiment import heuristic_negativity
from services.chat.text import LanguageDetector, bm25_tokens, mask_pii, order_ids


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector()


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("My parcel has not arrived yet, can you check it?", "en"),
        ("Mi paquete todavía no ha llegado, ¿pueden revisarlo?", "es"),
        ("Mein Paket ist noch nicht angekommen, können Sie nachsehen?", "de"),
        ("Mon colis n'est pas encore arrivé, pouvez-vous vérifier ?", "fr"),
        ("Minha encomenda ainda não chegou, vocês podem verificar?", "pt"),
        ("我的包裹还没到，能帮我查一下吗？", "zh"),
        ("荷物がまだ届いていません。確認してもらえますか？", "ja"),
        ("order CB-100231 where is it", "en"),  # the order id does not sway the detector
    ],
)
def test_language_detection(detector: LanguageDetector, text: str, language: str) -> None:
    assert detector.detect(text).code == language


def test_language_detection_never_downloads(detector: LanguageDetector) -> None:
    # model="lite" is the packaged lid.176.ftz; "auto" would fetch the large model on first use.
    assert detector._detector.config.model == "lite"
    assert "low_memory" in detector._detector._models


def test_masking_cards_emails_phones_keeps_order_ids() -> None:
    text = "Card 4111 1111 1111 1111, mail jane.doe@example.com, call +49 170 1234567 about CB-100231"
    masked = mask_pii(text)
    assert "4111" not in masked and "jane.doe" not in masked and "1234567" not in masked
    assert "[card]" in masked and "[email]" in masked and "[phone]" in masked
    assert "CB-100231" in masked
    assert mask_pii("4111-1111-1111-1112") == "[number]"  # card-shaped but fails the Luhn check
    assert mask_pii("no personal data here") == "no personal data here"


def test_order_ids_are_normalised() -> None:
    assert order_ids("cb100231 and #100245, again CB-100231") == ["CB-100231", "CB-100245"]
    assert order_ids("phone 0301234567") == []
    assert order_ids("注文CB-100231の状況") == ["CB-100231"]  # no space before the id in CJK text
    assert order_ids("ABCB-100231") == []


def test_bm25_tokens_split_cjk_into_characters_and_bigrams() -> None:
    tokens = bm25_tokens("退货政策 Envío")
    assert {"退", "货", "退货", "货政", "envio"} <= set(tokens)


def test_anger_heuristic() -> None:
    assert heuristic_negativity("This is the worst service, a total scam!!") >= 0.4
    assert heuristic_negativity("太过分了，我要投诉") >= 0.4
    assert heuristic_negativity("How long does shipping to Spain take?") < 0.4


def test_product_copy_units_and_currency_follow_the_market() -> None:
    facts = ProductFacts("Trail shoe", "running shoes", {"color": "blue"}, ("USD", 1234.5), 30, 12, 10, 1.0)
    us = build_template(facts, "en", "US")
    assert any("11.8 × 4.7 × 3.9 in" in b for b in us.bullets)
    assert any("2.2 lb" in b for b in us.bullets)
    assert any("$1,234.50" in b for b in us.bullets)
    de = build_template(ProductFacts("Laufschuh", "Schuhe", {}, ("EUR", 1234.5), 30, 12, 10, 1.0), "de", "DE")
    assert any("30 × 12 × 10 cm" in b for b in de.bullets)
    assert any("1.234,50" in b and "€" in b for b in de.bullets)
    assert "Deutschland" in de.description


def test_product_copy_validation_names_fields() -> None:
    facts = ProductFacts("", "", {}, ("eu", -1.0), -2.0)
    fields = {v.field for v in validate_copy_request(facts, "deu", "Germany")}
    assert {
        "product.name",
        "product.price.currency_code",
        "product.price.amount",
        "product.length_cm",
        "target_language",
        "target_market",
    } <= fields
