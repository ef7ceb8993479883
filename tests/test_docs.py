"""README.md and docs/: the flags reference is the code's, every relative link lands on a file (and heading) that
exists, the README stays short and leads with a table of contents that matches its headings, and its test
command is the one CI runs."""

import re

from conftest import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 220  # the issue asks for about 200; a little slack for the lead's trace table
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text a reader sees as Markdown: code blocks and inline code removed, so `# a comment` in a bash block
    is no heading and `[i](j)` in code is no link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def headings(text, level=None):
    marks = "#" * level + " " if level else "#"
    return [line.lstrip("#").strip() for line in prose(text).splitlines() if line.startswith(marks)]


def github_anchor(heading):
    """The id GitHub gives a heading: lower case, punctuation (backticks, dots, slashes, colons) dropped, spaces
    made hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path):
    return {github_anchor(heading) for heading in headings(path.read_text(encoding="utf-8"))}


def relative_links(path):
    links = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"[a-z]+:", link)]  # http:, https:, mailto:


def test_docs_flags_md_is_what_python_m_imgft_flags_prints(capsys):
    from imgft.commands.cli import main

    main(["flags"])
    printed = capsys.readouterr().out
    written = (REPO / "docs" / "flags.md").read_text(encoding="utf-8")
    # Regenerate with the command the file's header names, rather than editing it by hand.
    assert written == printed, "docs/flags.md drifted from the code: python -m imgft flags > docs/flags.md"
    assert "python -m imgft flags > docs/flags.md" in written
    for flag in ("--train_dir", "--model_name_or_path", "--learning_rate", "--use_peft", "--streaming"):
        assert f"| `{flag}` |" in written


def test_readme_commands_are_the_demo_and_ci_test_command_then_the_fast_path():
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Two commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]
    assert blocks == [
        "pip install -r requirements.txt && python train_loop.py",
        "python -m pytest -q",
        'python -m pytest -q -m "not slow"',
    ]
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == blocks[1]


def test_every_relative_link_lands_on_a_file_and_heading_that_exist():
    broken = []
    for page in [README, *DOCS]:
        for link in relative_links(page):
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{page.name}: {link} (no file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert broken == []


def test_readme_is_short_and_its_contents_match_its_headings():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    sections = headings(text, level=2)
    assert sections[0] == "Contents"
    contents = text.split("\n## Contents\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)$", contents, re.MULTILINE)
    assert [name for name, _ in entries] == sections[1:]
    assert [anchor for _, anchor in entries] == [github_anchor(section) for section in sections[1:]]


def test_every_docs_page_opens_with_a_title_and_one_line_summary_and_the_readme_links_it():
    readme_links = set(relative_links(README))
    for page in DOCS:
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and lines[2] and lines[3] == "", page.name
        assert f"docs/{page.name}" in readme_links, page.name
