"""Static checks of the Slicer module file ``AttentionSeg/AttentionSeg.py`` and its resources.

``AttentionSeg.py`` needs the Slicer application (``qt``, ``ScriptedLoadableModule``), so it is parsed with
``ast`` instead of imported: every widget it uses exists in the ``.ui``, every widget bound to the parameter
node names a real parameter of a type its widget can show, and it follows the scripted-module template.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "AttentionSeg"
MODULE_FILE = MODULE_DIR / "AttentionSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AttentionSeg.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "AttentionSeg.png"

# widget classes the parameter node wrapper can bind, and the annotation each needs ("GUI Connection" docs)
BINDABLE = {
    "qMRMLNodeComboBox": "vtkMRML",
    "ctkPathLineEdit": "pathlib.Path",
    "QComboBox": "Choice",
    "ctkSliderWidget": "WithinRange",
    "QCheckBox": "bool",
}
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QProgressBar", "QCheckBox", "QLineEdit"}


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in root.iter("widget")}


def bound_parameters(root: ET.Element) -> dict[str, ET.Element]:
    """``{parameter name: widget}`` for widgets carrying the ``SlicerParameterName`` dynamic property."""
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget
    return bound


def class_def(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    assert found, f"{MODULE_FILE.name} defines no class {name}"
    return found[0]


def parameter_annotations(tree: ast.Module) -> dict[str, str]:
    parameters = class_def(tree, "AttentionSegParameterNode")
    return {node.target.id: ast.unparse(node.annotation) for node in parameters.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


# -- the .ui -------------------------------------------------------------------------------------------------


def test_ui_is_a_qt_designer_file_of_a_mrml_widget(ui_root: ET.Element) -> None:
    assert ui_root.tag == "ui"
    top = ui_root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "AttentionSeg"


def test_ui_object_names_are_unique(ui_root: ET.Element) -> None:
    names = [widget.get("name") for widget in ui_root.iter("widget")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_every_custom_widget_of_the_ui_is_declared(ui_root: ET.Element) -> None:
    used = {widget.get("class") for widget in ui_root.iter("widget")} - QT_CLASSES
    declared = {custom.findtext("class") for custom in ui_root.iter("customwidget")}
    assert used <= declared, f"declare {sorted(used - declared)} under <customwidgets>"


def test_every_mrml_widget_gets_the_scene(ui_root: ET.Element) -> None:
    mrml_widgets = {name for name, widget in ui_widgets(ui_root).items()
                    if widget.get("class", "").startswith("qMRML") and name != "AttentionSeg"}
    connected = {c.findtext("receiver") for c in ui_root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml_widgets <= connected


# -- AttentionSeg.py against the .ui -------------------------------------------------------------------------


def test_every_ui_widget_the_module_uses_exists_in_the_ui(module_tree: ast.Module,
                                                          ui_root: ET.Element) -> None:
    used = {node.attr for node in ast.walk(module_tree)
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.ui"}

    assert len(used) > 20, "the scan found the module's widgets"
    assert used <= set(ui_widgets(ui_root)), f"not in the .ui: {sorted(used - set(ui_widgets(ui_root)))}"


def test_every_button_of_the_ui_does_something(module_tree: ast.Module, ui_root: ET.Element) -> None:
    source = MODULE_FILE.read_text()
    buttons = [name for name, widget in ui_widgets(ui_root).items() if widget.get("class") == "QPushButton"]

    assert buttons
    unconnected = [name for name in buttons if f"self.ui.{name}.connect(" not in source]
    assert not unconnected, f"buttons without a handler: {unconnected}"


def test_every_bound_widget_names_a_parameter_of_a_type_it_can_show(module_tree: ast.Module,
                                                                   ui_root: ET.Element) -> None:
    annotations = parameter_annotations(module_tree)
    bound = bound_parameters(ui_root)

    assert {"inputVolume", "device", "timeBudgetS", "overlayOpacity"} <= set(bound)
    for parameter, widget in bound.items():
        assert parameter in annotations, f"SlicerParameterName '{parameter}' is not a parameter of the node"
        needed = BINDABLE.get(widget.get("class"))
        widget_class = widget.get("class")
        assert needed is not None, f"{widget.get('name')}: no parameter-node connector for {widget_class}"
        assert needed in annotations[parameter], f"{parameter}: {widget_class} needs a {needed} annotation"


def test_parameter_node_annotations_resolve_on_older_pythons(module_tree: ast.Module) -> None:
    # the wrapper evaluates annotations with typing.get_type_hints; "X | None" fails on Slicer's Python 3.9
    assert all("|" not in annotation for annotation in parameter_annotations(module_tree).values())


# -- the scripted-module template ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "base"), [
    ("AttentionSeg", "ScriptedLoadableModule"),
    ("AttentionSegWidget", "ScriptedLoadableModuleWidget"),
    ("AttentionSegLogic", "ScriptedLoadableModuleLogic"),
    ("AttentionSegTest", "ScriptedLoadableModuleTest"),
])
def test_module_has_the_template_classes(module_tree: ast.Module, name: str, base: str) -> None:
    assert base in [ast.unparse(b) for b in class_def(module_tree, name).bases]


def test_parameter_node_is_a_parameter_node_wrapper(module_tree: ast.Module) -> None:
    decorators = [ast.unparse(d) for d in class_def(module_tree, "AttentionSegParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_self_test_runs_the_workflow(module_tree: ast.Module) -> None:
    methods = {node.name for node in class_def(module_tree, "AttentionSegTest").body
               if isinstance(node, ast.FunctionDef)}
    assert {"setUp", "runTest", "test_ClickScribbleRefine"} <= methods


def test_module_loads_without_torch(module_tree: ast.Module) -> None:
    """Slicer must load the module before PyTorch is installed, so that it can offer to install it."""
    top_level = [node for node in module_tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top_level for alias in node.names} | \
            {node.module for node in top_level if isinstance(node, ast.ImportFrom)}
    assert not {"torch", "AttentionSegLib"} & names


def test_icon_is_128_pixels_square_and_drawn_by_its_script() -> None:
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_icon", ICON_FILE.parent / "make_icon.py")
    make_icon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icon)

    with image_module.open(ICON_FILE) as committed:
        assert committed.size == (128, 128)
        assert committed.convert("RGBA").tobytes() == make_icon.draw_icon().tobytes()
