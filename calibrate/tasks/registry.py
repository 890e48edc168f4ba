"""The dataset registry: what the loader knows about each benchmark besides its config.

Each config name (``conf/dataset/<name>.yaml``) maps to a :class:`DatasetSpec`: the row
normalizer of :mod:`calibrate.tasks.records`, the splits that exist, the option count and whether
the rows list the correct option first. A new dataset is its config file (or a node stored in
Hydra's ConfigStore under ``dataset``) and one :func:`register_dataset` call beside its row
normalizer. MMLU's subjects and lm-eval's grouping of them into categories are defined here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibrate.tasks.lmeval_tasks import LMEVAL, normalize_lmeval
from calibrate.tasks.records import (
    Normalizer,
    normalize_arc,
    normalize_boolq,
    normalize_copa,
    normalize_hellaswag,
    normalize_mmlu,
    normalize_openbookqa,
    normalize_piqa,
    normalize_sciq,
    normalize_truthfulqa,
    sentiment_normalizer,
)


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader knows about one dataset besides its config."""

    normalize: Normalizer
    splits: tuple[str, ...]          # the splits that exist (on the hub)
    n_options: int | None = None     # a fixed number of options; None when it varies by row
    shuffle_options: bool = False    # rows list the correct option first: shuffle with the seed
    fields: str = ""                 # the fields a row needs, named in errors


TRAIN_VAL_TEST = ("train", "validation", "test")
MMLU_SPLITS = ("dev", "validation", "test")
ARC_FIELDS = "question, choices {text, label}, answerKey"
DATASET_SPECS: dict[str, DatasetSpec] = {
    "mmlu": DatasetSpec(normalize_mmlu, MMLU_SPLITS, 4,
                        fields="question, subject, choices (4 strings), answer (index or letter)"),
    "arc_easy": DatasetSpec(normalize_arc, TRAIN_VAL_TEST, fields=ARC_FIELDS),
    "arc_challenge": DatasetSpec(normalize_arc, TRAIN_VAL_TEST, fields=ARC_FIELDS),
    "truthfulqa": DatasetSpec(normalize_truthfulqa, ("validation",), shuffle_options=True,
                              fields="Question, Best Answer, Incorrect Answers (the CSV) or "
                                     "question, mc1_targets {choices, labels} (the hub form)"),
    "rotten_tomatoes": DatasetSpec(sentiment_normalizer("text"), TRAIN_VAL_TEST, 2,
                                   fields="text, label (0 negative, 1 positive)"),
    "sst2": DatasetSpec(sentiment_normalizer("sentence"), TRAIN_VAL_TEST, 2,
                        fields="sentence, label (0 negative, 1 positive)"),
    "copa": DatasetSpec(normalize_copa, TRAIN_VAL_TEST, 2,
                        fields="premise, choice1, choice2, question (cause or effect), label"),
    "boolq": DatasetSpec(normalize_boolq, ("train", "validation"), 2,
                         fields="passage, question, answer (true or false)"),
    "hellaswag": DatasetSpec(normalize_hellaswag, TRAIN_VAL_TEST, 4,
                             fields="activity_label, ctx_a, ctx_b, endings (4 strings), label"),
    "openbookqa": DatasetSpec(normalize_openbookqa, TRAIN_VAL_TEST, 4,
                              fields="question_stem, choices {text, label}, answerKey"),
    "piqa": DatasetSpec(normalize_piqa, TRAIN_VAL_TEST, 2, fields="goal, sol1, sol2, label"),
    "sciq": DatasetSpec(normalize_sciq, TRAIN_VAL_TEST, 4, shuffle_options=True,
                        fields="question, correct_answer, distractor1, distractor2, distractor3 "
                               "(support optional)"),
    LMEVAL: DatasetSpec(normalize_lmeval, ("eval",),
                        fields="context, choices, label (made by lm-eval's task machinery)"),
}
DATASETS: tuple[str, ...] = tuple(sorted(DATASET_SPECS))  # the built-in ones


def register_dataset(name: str, spec: DatasetSpec) -> DatasetSpec:
    """Make a dataset config named ``name`` loadable with ``spec`` (its normalizer, splits ...)."""
    if name in DATASET_SPECS and DATASET_SPECS[name] != spec:
        raise ValueError(f"a dataset named {name!r} is registered already")
    DATASET_SPECS[name] = spec
    return spec


def dataset_names() -> list[str]:
    """Every registered dataset, sorted."""
    return sorted(DATASET_SPECS)


# lm-eval's grouping of the 57 MMLU subjects (lm_eval/tasks/mmlu/_generate_configs.py).
MMLU_CATEGORIES: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem",
    "college_mathematics": "stem", "college_medicine": "other", "college_physics": "stem",
    "computer_security": "stem", "conceptual_physics": "stem", "econometrics": "social_sciences",
    "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other",
    "marketing": "other", "medical_genetics": "other", "miscellaneous": "other",
    "moral_disputes": "humanities", "moral_scenarios": "humanities", "nutrition": "other",
    "philosophy": "humanities", "prehistory": "humanities", "professional_accounting": "other",
    "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}
MMLU_SUBJECTS: tuple[str, ...] = tuple(MMLU_CATEGORIES)
MMLU_CATEGORY_NAMES: tuple[str, ...] = ("stem", "humanities", "social_sciences", "other")
