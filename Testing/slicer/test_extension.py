"""Static checks of the extension's build and catalog files: CMake lists, ``.s4ext``, catalog ``.json``.

The CMake lists are not run here (that needs a Slicer build tree); their ``file(GLOB_RECURSE ...)`` patterns
are evaluated in Python instead, so a file added to the engine that Slicer would not install fails this test.
"""

from __future__ import annotations

import ast
import fnmatch
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "AttentionSeg"
ENGINE_DIR = REPO_ROOT / "AttentionSegLib"
ROOT_CMAKE = REPO_ROOT / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
S4EXT = REPO_ROOT / "AttentionSeg.s4ext"
CATALOG_ENTRY = REPO_ROOT / "AttentionSeg.json"

# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (additionalProperties: false)
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
                                      "build_subdirectory", "enabled", "tier"}
S4EXT_KEYS = {"scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
              "category", "iconurl", "status", "description", "screenshoturls", "enabled"}
# files the build tools never install: caches, and the script that draws the icon
NOT_INSTALLED = ("__pycache__", ".pyc")


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of every command invocation in a CMake file.

    A small reader of the CMake language: ``#`` comments outside quotes, quoted arguments (returned without
    their quotes, so ``"a b"`` stays one argument), and parentheses inside arguments.
    """
    text = path.read_text()
    commands: list[tuple[str, list[str]]] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif char.isalpha() or char == "_":
            start = i
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
            name = text[start:i]
            while i < n and text[i] in " \t":
                i += 1
            if i >= n or text[i] != "(":
                continue
            i += 1
            args: list[str] = []
            depth = 0
            while i < n:
                char = text[i]
                if char == "#":
                    i = text.find("\n", i)
                elif char == '"':
                    end = i + 1
                    while text[end] != '"':
                        end += 2 if text[end] == "\\" else 1
                    args.append(text[i + 1:end])
                    i = end + 1
                elif char == "(":
                    depth += 1
                    i += 1
                elif char == ")":
                    if depth == 0:
                        i += 1
                        break
                    depth -= 1
                    i += 1
                elif char.isspace():
                    i += 1
                else:
                    end = i
                    while end < n and not text[end].isspace() and text[end] not in '()"#':
                        end += 1
                    args.append(text[i:end])
                    i = end
            commands.append((name.lower(), args))
        else:
            i += 1
    return commands


def cmake_calls(path: Path, command: str) -> list[list[str]]:
    """The arguments of every call of ``command`` in a CMake file."""
    return [args for name, args in cmake_commands(path) if name == command.lower()]


def cmake_set(path: Path, name: str) -> list[str]:
    for args in cmake_calls(path, "set"):
        if args and args[0] == name:
            return args[1:]
    raise AssertionError(f"no set({name} ...) in {path.name}")


def glob_recurse(path: Path, variable: str, variables: dict[str, str]) -> set[Path]:
    """The files ``file(GLOB_RECURSE <variable> ...)`` matches, evaluated like CMake (``*`` spans folders)."""
    for args in cmake_calls(path, "file"):
        if args[:2] == ["GLOB_RECURSE", variable]:
            patterns = [a for a in args[2:] if a not in {"RELATIVE", "CONFIGURE_DEPENDS"} and "/" in a]
            patterns = [p for p in patterns if p != "${PROJECT_SOURCE_DIR}"]
            break
    else:
        raise AssertionError(f"no file(GLOB_RECURSE {variable} ...)")
    matched: set[Path] = set()
    for pattern in patterns:
        for key, value in variables.items():
            pattern = pattern.replace("${" + key + "}", value)
        folder, _, wildcard = pattern.rpartition("/")
        for path in Path(folder).rglob("*"):
            if path.is_file() and fnmatch.fnmatch(path.name, wildcard):
                matched.add(path.resolve())
    return matched


def engine_files() -> set[Path]:
    return {p.resolve() for p in ENGINE_DIR.rglob("*")
            if p.is_file() and not any(part in str(p) for part in NOT_INSTALLED)}


def s4ext() -> dict[str, str]:
    entries = {}
    for line in S4EXT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    return entries


# -- the module's CMake list ---------------------------------------------------------------------------------


def test_every_python_file_of_the_module_is_installed() -> None:
    scripts = cmake_set(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")
    listed = {name.replace("${MODULE_NAME}", "AttentionSeg") for name in scripts}

    assert listed == {p.name for p in MODULE_DIR.glob("*.py")}


def test_every_module_resource_is_installed_and_exists() -> None:
    resources = [r.replace("${MODULE_NAME}", "AttentionSeg")
                 for r in cmake_set(MODULE_CMAKE, "MODULE_PYTHON_RESOURCES")]

    assert all((MODULE_DIR / r).is_file() for r in resources), resources
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*")
               if p.is_file() and p.suffix in {".png", ".ui"}}
    assert on_disk <= set(resources)


def test_every_engine_file_is_installed_beside_the_module() -> None:
    variables = {"PROJECT_SOURCE_DIR": str(REPO_ROOT), "ATTENTIONSEGLIB_DIR": str(ENGINE_DIR)}

    installed = glob_recurse(MODULE_CMAKE, "ATTENTIONSEGLIB_PYTHON_SCRIPTS", variables) | \
        glob_recurse(MODULE_CMAKE, "ATTENTIONSEGLIB_RESOURCES", variables)

    assert (ENGINE_DIR / "__init__.py").resolve() in installed
    missing = sorted(str(p.relative_to(REPO_ROOT)) for p in engine_files() - installed)
    assert not missing, f"AttentionSegLib files the Slicer build would not install: {missing}"


def test_engine_is_copied_into_the_scripted_modules_folder() -> None:
    calls = cmake_calls(MODULE_CMAKE, "ctkMacroCompilePythonScript")

    assert len(calls) == 1
    args = " ".join(calls[0])
    assert "SCRIPTS ${ATTENTIONSEGLIB_PYTHON_SCRIPTS}" in args
    assert "RESOURCES ${ATTENTIONSEGLIB_RESOURCES}" in args
    assert "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in args  # keeps the AttentionSegLib/ prefix in the destination
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in args
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in args


def test_package_data_of_the_engine_is_installed_too() -> None:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    patterns = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    variables = {"PROJECT_SOURCE_DIR": str(REPO_ROOT), "ATTENTIONSEGLIB_DIR": str(ENGINE_DIR)}
    installed = glob_recurse(MODULE_CMAKE, "ATTENTIONSEGLIB_RESOURCES", variables)

    package_data = {p.resolve() for pattern in patterns.get("AttentionSegLib", [])
                    for p in ENGINE_DIR.glob(pattern)}
    assert package_data <= installed


def test_slicer_runs_the_module_self_test() -> None:
    calls = cmake_calls(MODULE_CMAKE, "slicer_add_python_unittest")
    assert ["SCRIPT", "${MODULE_NAME}.py"] in calls
    assert ["NAME", "${MODULE_NAME}"] == cmake_calls(MODULE_CMAKE, "slicerMacroBuildScriptedModule")[0][:2]


def test_module_helpers_import_no_gui_and_the_engine_only_through_its_public_api() -> None:
    exports = _engine_exports()
    for path in MODULE_DIR.glob("AttentionSeg*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("AttentionSegLib"):
                assert node.module == "AttentionSegLib", f"{path.name} reaches into {node.module}"
                assert {a.name for a in node.names} <= exports, f"{path.name}: not public: {node.names}"
        if path.name != "AttentionSeg.py":  # the helpers run on the bare Slicer core, without Qt
            assert not {"qt", "ctk"} & imported_modules(tree), path.name


def test_engine_imports_neither_slicer_nor_qt_nor_vtk() -> None:
    for path in ENGINE_DIR.rglob("*.py"):
        modules = imported_modules(ast.parse(path.read_text()))
        assert not {"slicer", "qt", "ctk", "vtk"} & modules, f"{path.relative_to(REPO_ROOT)}: {modules}"


def imported_modules(tree: ast.Module) -> set[str]:
    """Top-level names of the absolute imports anywhere in a module (``import a.b``, ``from a.b``: a)."""
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    return modules | {node.module.split(".")[0] for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}


def _engine_exports() -> set[str]:
    tree = ast.parse((ENGINE_DIR / "__init__.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS":
            return set(ast.literal_eval(node.value))
    raise AssertionError("AttentionSegLib/__init__.py lists no _EXPORTS")


# -- the extension -------------------------------------------------------------------------------------------


def test_extension_cmake_describes_a_segmentation_extension_needing_pytorch() -> None:
    assert cmake_set(ROOT_CMAKE, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert "PyTorch" in cmake_set(ROOT_CMAKE, "EXTENSION_DEPENDS")
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                 "EXTENSION_SCREENSHOTURLS"):
        assert cmake_set(ROOT_CMAKE, name), name
    assert ["AttentionSeg"] in cmake_calls(ROOT_CMAKE, "add_subdirectory")
    assert ["AttentionSeg"] in cmake_calls(ROOT_CMAKE, "project")


def test_s4ext_has_every_field_and_agrees_with_the_cmake_list() -> None:
    entries = s4ext()

    assert S4EXT_KEYS <= set(entries), sorted(S4EXT_KEYS - set(entries))
    assert entries["scm"] == "git"
    assert entries["category"] == cmake_set(ROOT_CMAKE, "EXTENSION_CATEGORY")[0]
    assert entries["depends"].split() == cmake_set(ROOT_CMAKE, "EXTENSION_DEPENDS")
    assert entries["homepage"] == cmake_set(ROOT_CMAKE, "EXTENSION_HOMEPAGE")[0]
    assert entries["iconurl"].endswith("AttentionSeg/Resources/Icons/AttentionSeg.png")
    assert entries["screenshoturls"].split() == cmake_set(ROOT_CMAKE, "EXTENSION_SCREENSHOTURLS")


def test_icon_and_screenshot_urls_name_files_of_this_repository() -> None:
    """The Extensions Index fetches these from the main branch: a path that is not
    committed is a broken image."""
    urls = [*cmake_set(ROOT_CMAKE, "EXTENSION_ICONURL"), *cmake_set(ROOT_CMAKE, "EXTENSION_SCREENSHOTURLS")]
    assert len(urls) >= 2
    for url in urls:
        marker = "/main/"
        assert marker in url, url
        path = REPO_ROOT / url.split(marker, 1)[1]
        assert path.is_file(), f"{url}: {path.relative_to(REPO_ROOT)} is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"


def test_catalog_entry_follows_the_extensions_index_schema() -> None:
    entry = json.loads(CATALOG_ENTRY.read_text())

    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_ALLOWED
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-v")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry.get("scm_type", "git") in {"git", "local"}
    assert isinstance(entry.get("enabled", True), bool)


def test_catalog_entry_agrees_with_the_s4ext_and_the_cmake_list() -> None:
    entry = json.loads(CATALOG_ENTRY.read_text())
    entries = s4ext()

    assert entry["category"] == entries["category"]
    assert entry["build_dependencies"] == entries["depends"].split()
    assert entry["scm_url"].removesuffix(".git") == entries["scmurl"].removesuffix(".git")
    assert entry["scm_revision"] == entries["scmrevision"]
