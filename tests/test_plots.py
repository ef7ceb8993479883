"""imgft.report.plots: class names in the pictures stay distinct when shortened, and drawable or warned about."""

import logging

import pytest
from PIL import Image

from imgft.report import plots

LONG_NAMES = [f"a_rather_long_species_name_{i}" for i in range(120)]


def test_long_names_sharing_a_prefix_stay_distinct_within_the_width():
    short = plots.short_names(LONG_NAMES + ["cat"])
    assert len(set(short)) == len(short)
    assert all(len(name) <= plots.MAX_LABEL_CHARS for name in short)
    assert short[-1] == "cat"  # a short name is left whole
    for i, name in enumerate(short[:-1]):
        assert name.startswith("a_rather") and name.endswith(f"_{i}") and "…" in name, name


def test_names_that_differ_only_far_inside_end_in_their_place():
    names = [f"{'x' * 30}_{i}_{'y' * 30}" for i in range(12)]
    short = plots.short_names(names)
    assert len(set(short)) == 12
    assert all(len(name) <= plots.MAX_LABEL_CHARS for name in short)
    assert short[11].endswith("…#11")


def test_confusion_matrix_and_mistakes_name_long_classes_apart():
    figure = plots.confusion_matrix_figure([[1] * 120] * 120, LONG_NAMES)
    axes = figure.axes[0]
    for labels in (axes.get_xticklabels(), axes.get_yticklabels()):
        assert len({label.get_text() for label in labels}) == 120
    mistakes = [
        {"true_label": LONG_NAMES[i], "predicted_label": LONG_NAMES[i + 1], "score": 0.9} for i in range(0, 8, 2)
    ]
    figure = plots.mistakes_figure([Image.new("RGB", (8, 8))] * 4, mistakes)
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert len(set(titles)) == 4
    assert all(f"_{i}\n" in title for i, title in zip(range(0, 8, 2), titles, strict=True))


def box_warnings(caplog):
    return [record.getMessage() for record in caplog.records if "boxes" in record.getMessage()]


def test_names_no_font_can_draw_are_warned_about_once_with_how_to_get_a_font(monkeypatch, caplog):
    monkeypatch.setattr(plots, "CJK_FONT_FAMILIES", ())  # as on a machine with no CJK font
    monkeypatch.setattr(plots, "_warned_characters", set())
    names = ["鳥", "猫", "cat"]
    with caplog.at_level(logging.WARNING, logger="imgft"):
        plots.confusion_matrix_figure([[1, 0, 0], [0, 1, 0], [0, 0, 1]], names)
        mistakes = [{"true_label": "鳥", "predicted_label": "猫", "score": 0.9}]
        plots.mistakes_figure([Image.new("RGB", (8, 8))], mistakes)
    warnings = box_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "猫鳥" in warnings[0] and "apt-get install fonts-noto-cjk" in warnings[0]


def test_latin_names_need_no_other_font(caplog):
    with caplog.at_level(logging.WARNING, logger="imgft"):
        assert plots.name_font_families(["café", "naïve", "Straße"]) is None
    assert not box_warnings(caplog)


@pytest.mark.skipif(not plots._cjk_fonts(), reason="no CJK font installed (e.g. apt-get install fonts-noto-cjk)")
def test_an_installed_cjk_font_draws_cjk_names(caplog):
    with caplog.at_level(logging.WARNING, logger="imgft"):
        figure = plots.confusion_matrix_figure([[1, 0], [0, 1]], ["鳥", "cat"])
    families = figure.axes[0].get_xticklabels()[0].get_fontfamily()
    assert families[0] == "DejaVu Sans" and families[1].startswith(plots.CJK_FONT_FAMILIES), families
    assert not box_warnings(caplog)
