"""The offline check of the Hub's metadata rules, and ISO 639 lookups."""

from __future__ import annotations

import pytest

from lrmerge_hub.metadata import check_metadata, is_language_code, language_name, language_tag

GOOD = {
    "base_model": ["meta-llama/Llama-2-7b-hf", "pkupie/Llama-2-7b-bod"],
    "language": ["bo", "khk", "tib"],
    "library_name": "transformers",
    "license": "llama2",
    "pipeline_tag": "text-generation",
    "tags": ["merge", "tibetan"],
    "base_model_relation": "merge",
    "model-index": [
        {
            "name": "m",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"type": "facebook/belebele", "name": "belebele_bod_Tibt"},
                    "metrics": [{"type": "acc", "value": 0.35}],
                    "source": {"name": "lm-eval", "url": "https://github.com/EleutherAI/lm-evaluation-harness"},
                }
            ],
        }
    ],
}


def test_good_metadata_passes():
    assert check_metadata(GOOD) == []


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"language": ["bo", "xx"]}, "language: unknown ISO 639 code 'xx'"),
        ({"language": 3}, "language: must be"),
        ({"license": "llama-2"}, "license: 'llama-2' is not a Hub license id"),
        ({"license": ["mit", "apache-2.0"]}, "is not a Hub license id"),
        ({"base_model_relation": ["merge"]}, "base_model_relation: must be one of"),
        ({"pipeline_tag": ["text-generation"]}, "pipeline_tag: must be a string"),
        ({"license": "other"}, "license_name: required"),
        ({"license": "other", "license_name": "My License", "license_link": "https://x"}, "license_name: required"),
        ({"license_name": "x"}, "only used with license 'other'"),
        ({"base_model": ["/tmp/models/base"]}, "is not a Hub model id"),
        ({"base_model": ["a/b", "a/b"]}, "lists a model twice"),
        ({"base_model_relation": "merged"}, "base_model_relation: must be one of"),
        ({"pipeline_tag": "text-classification"}, "pipeline_tag"),
        ({"tags": "merge"}, "tags: must be a list"),
        (
            {
                "model-index": [
                    {
                        "name": "m",
                        "results": [
                            {"task": {"type": "t"}, "dataset": {"type": "d", "name": "n"}, "metrics": [{"type": "acc"}]}
                        ],
                    }
                ]
            },
            "value (number) are required",
        ),
        ({"model-index": [{"results": []}]}, "model-index[0].name: required"),
    ],
)
def test_each_rule_catches_its_mistake(change, problem):
    problems = check_metadata(dict(GOOD, **change))
    assert any(problem in p for p in problems), problems


def test_relation_needs_a_base_model():
    meta = {k: v for k, v in GOOD.items() if k != "base_model"}
    assert check_metadata(meta) == ["base_model_relation: needs base_model"]


def test_iso_639_codes_and_names():
    assert [is_language_code(c) for c in ("bo", "bod", "tib", "khk", "afa", "multilingual", "xx", "BO", "")] == [
        True,
        True,
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert language_name("sw") == "Swahili"
    assert language_name("ta") == "Tamil"
    assert language_tag("el") == "modern-greek"
    with pytest.raises(KeyError):
        language_name("xx")
