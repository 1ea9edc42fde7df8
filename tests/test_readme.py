"""The README's command reference is the parser's own (tools/readme_usage.py renders it): a flag added, renamed or
given another default without the README following fails here."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_usage_section_matches_the_parser():
    spec = importlib.util.spec_from_file_location("readme_usage", ROOT / "tools" / "readme_usage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- usage:start -->")[1].split("<!-- usage:end -->")[0].strip()
    assert section == mod.render().strip(), "README's usage section is stale: run python tools/readme_usage.py"


def test_quickstart_commands_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("<!-- quickstart:start -->")[1].split("<!-- quickstart:end -->")[0]
    assert "make demo" in quick and "make test" in quick
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "huggingface-cli" not in quick  # today's huggingface_hub spells it `hf download`
