"""AttentionSeg: interactive segmentation with attention networks in 3D Slicer (click, scribble, refine).

Slicer 5.x scripted module (Module, parameter node, Widget, Logic, Test). The module is thin on purpose: the
Widget only reads the GUI and forwards to the Logic; the Logic's workflow (``AttentionSegController``)
converts MRML to engine data (``AttentionSegMRML``) and runs the engine (``AttentionSegLib``) off the GUI
thread through the backend seam (``AttentionSegBackend``). Those three modules import without ``qt`` and are
tested in CI on the bare Slicer core; this file needs the Slicer application.
"""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import AttentionSegMRML as mrml
from AttentionSegBackend import Job, JobState
from AttentionSegController import SegmentationController, parse_model_options
from AttentionSegRemoteBackend import RemoteBackend

#: the model combo box entry that means "use the checkpoint file chosen below"
CHECKPOINT_ENTRY = "Checkpoint file"
DEVICES = ["auto", "cpu", "cuda", "mps"]
POLL_INTERVAL_MS = 100
PREFETCH_DELAY_MS = 600  # a slice view that rests this long is prepared for a click (LiteMedSAM)
THIS_COMPUTER, SERVER = "This computer", "Server"
DEFAULT_SERVER_URL = "http://127.0.0.1:8765"
#: the server token lives in this computer's Slicer settings, never in the scene (scenes are shared)
SERVER_TOKEN_SETTING = "AttentionSeg/ServerToken"
CONNECTION_TIMEOUT_S = 5.0
SCRIBBLE_EDITOR_NODE_TAG = "AttentionSegScribbleEditor"


#
# AttentionSeg
#


class AttentionSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AttentionSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AttentionSeg developers"]
        self.parent.helpText = _("""
Interactive segmentation with attention networks: click on a structure, paint a few foreground and background
scribbles, refine (the network fine-tunes on your scribbles within a time budget), and look at the attention
gates and the uncertainty over the image. Long work runs in the background and can be cancelled; a failed step
leaves your segments and scribbles as they were.
See the <a href="https://github.com/attentionseg/AttentionSeg#use-in-3d-slicer">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
The attention gates follow Oktay et al., "Attention U-Net" (MIDL 2018); refinement from scribbles follows
Yang et al., "AttenScribble" (arXiv 2312.06614). PyTorch comes from the SlicerPyTorch extension.
""")


#
# AttentionSegParameterNode
#


@parameterNodeWrapper
class AttentionSegParameterNode:
    """The module's settings, saved with the scene.

    inputVolume - the image to segment.
    modelName - an installed model, or CHECKPOINT_ENTRY to use checkpointPath (set by the Widget, not bound).
    checkpointPath - a checkpoint file.
    device - auto, cpu, cuda or mps (on this computer).
    computeOn - THIS_COMPUTER, or SERVER: the engine runs on an 'attentionseg serve' machine at serverURL.
    serverURL - the server's address (set by the Widget, not bound); its token is a Slicer setting.
    outputSegmentation - where the segments go (created at session start when empty).
    scribbleSegmentation - the scribble segments (created at session start when empty).
    targetSegmentID - the segment clicks and scribbles edit (set by the Widget, not bound).
    timeBudgetS - how long a refinement may fine-tune.
    prepareSlices - whether the slice the red view rests on is prepared for a click (medsam_lite encodes it
        and the slices around it in the background).
    overlayColorMap, overlayOpacity - how attention and uncertainty overlays are shown.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    checkpointPath: pathlib.Path
    device: Annotated[str, Choice(DEVICES)] = "auto"
    computeOn: Annotated[str, Choice([THIS_COMPUTER, SERVER])] = THIS_COMPUTER
    serverURL: str = DEFAULT_SERVER_URL
    outputSegmentation: vtkMRMLSegmentationNode
    scribbleSegmentation: vtkMRMLSegmentationNode
    targetSegmentID: str = ""
    timeBudgetS: Annotated[float, WithinRange(1.0, 120.0)] = 10.0
    prepareSlices: bool = True
    overlayColorMap: Annotated[str, Choice(list(mrml.OVERLAY_COLOR_MAPS))] = "Inferno"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# AttentionSegWidget
#


class AttentionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: reads the .ui, forwards every action to the Logic, polls running jobs with a Qt timer."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: AttentionSegLogic | None = None
        self._parameterNode: AttentionSegParameterNode | None = None
        self._parameterNodeGuiTag: Any = None
        self._pollTimer: Any = None
        self._prefetchTimer: Any = None
        self._watchedSliceNode: Any = None  # the red view, whose slice is prepared for a click
        self._onSuccess: dict[Job, Callable[[Job], None]] = {}
        self._observedPointLists: list[Any] = []
        self._boxNode: Any = None
        self._boundsNode: Any = None
        self._scribbleEditorNode: Any = None
        self._serverModels: list[str] = []  # the models the server named at the last connection test
        self._listedServerModels: bool | None = None  # whether the model list shows the server's models

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AttentionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AttentionSegLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)
        self._prefetchTimer = qt.QTimer()
        self._prefetchTimer.setSingleShot(True)
        self._prefetchTimer.setInterval(PREFETCH_DELAY_MS)
        self._prefetchTimer.connect("timeout()", self.onPrefetch)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self._setupScribbleEditor()
        self.ui.modelComboBox.connect("currentTextChanged(QString)", self.onModelChanged)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerURLChanged)
        self.ui.serverTokenLineEdit.text = qt.QSettings().value(SERVER_TOKEN_SETTING, "") or ""
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onServerTokenChanged)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.targetSegmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.attentionGateComboBox.connect("currentTextChanged(QString)", self.onGateChanged)
        self.ui.startSessionButton.connect("clicked(bool)", self.onStartSession)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.positivePointButton.connect("clicked(bool)", lambda: self.onPlacePoints(True))
        self.ui.negativePointButton.connect("clicked(bool)", lambda: self.onPlacePoints(False))
        self.ui.clearPointsButton.connect("clicked(bool)", self.onClearPoints)
        self.ui.prepareSlicesCheckBox.connect("toggled(bool)", self.onPrepareSlicesToggled)
        self.ui.boxButton.connect("clicked(bool)", self.onDrawBox)
        self.ui.boundsButton.connect("clicked(bool)", self.onDrawBounds)
        self.ui.foregroundScribbleButton.connect("clicked(bool)", lambda: self.onPaintScribbles(True))
        self.ui.backgroundScribbleButton.connect("clicked(bool)", lambda: self.onPaintScribbles(False))
        self.ui.eraseScribbleButton.connect("clicked(bool)", self.onEraseScribbles)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.redoButton.connect("clicked(bool)", self.onRedo)
        self.ui.lockTargetButton.connect("toggled(bool)", self.onLockToggled)
        self.ui.showAttentionButton.connect("clicked(bool)", self.onShowAttention)
        self.ui.showUncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.hideOverlayButton.connect("clicked(bool)", self.onHideOverlay)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.exportSegmentationButton.connect("clicked(bool)", self.onExportSegmentation)

        self.initializeParameterNode()
        self._refreshModelList()
        self._updateGUI()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._prefetchTimer is not None:
            self._prefetchTimer.stop()
        if self.logic is not None:
            self.logic.close()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.ui.scribbleEditorWidget.installKeyboardShortcuts()

    def exit(self) -> None:
        self.ui.scribbleEditorWidget.setActiveEffect(None)
        self.ui.scribbleEditorWidget.uninstallKeyboardShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self.logic.close()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: AttentionSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self.ui.serverUrlLineEdit.text = self._parameterNode.serverURL
        self._updateGUI()

    def _onParameterNodeModified(self, caller: Any = None, event: Any = None) -> None:
        onServer = self._onServer()
        if onServer != self._listedServerModels:  # Compute on changed: the other side's models
            self._listedServerModels = onServer
            self._refreshModelList()
        self._updateGUI()
        self._applyOverlayDisplay()

    # -- GUI state -------------------------------------------------------------------------------------------
    def _updateGUI(self) -> None:
        pn = self._parameterNode
        controller = self.logic.controller if self.logic and self.logic.hasController else None
        sessionOpen = bool(controller and controller.session_open)
        busy = bool(controller and controller.busy)
        self.ui.startSessionButton.enabled = bool(pn and pn.inputVolume) and not busy
        onServer = self._onServer()
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverTokenLineEdit, self.ui.testConnectionButton):
            widget.enabled = onServer
        self.ui.deviceComboBox.enabled = not onServer  # the server's own --device does the work there
        self.ui.checkpointPathLineEdit.enabled = self.ui.modelComboBox.currentText == CHECKPOINT_ENTRY
        sessionButtons = (
            self.ui.segmentButton, self.ui.positivePointButton, self.ui.negativePointButton,
            self.ui.clearPointsButton, self.ui.foregroundScribbleButton, self.ui.backgroundScribbleButton,
            self.ui.eraseScribbleButton, self.ui.refineButton, self.ui.undoButton, self.ui.redoButton,
            self.ui.lockTargetButton, self.ui.showAttentionButton, self.ui.showUncertaintyButton,
            self.ui.saveModelButton, self.ui.exportSegmentationButton,
        )
        for button in sessionButtons:
            button.enabled = sessionOpen
        self.ui.cancelButton.enabled = busy
        self.ui.hideOverlayButton.enabled = bool(controller and controller.overlay_nodes)

    def _refreshModelList(self) -> None:
        """Listing installed models needs torch; before it is installed only the checkpoint entry shows."""
        names: list[str] = []
        if self._onServer():
            names = list(self._serverModels)
        elif self.logic.pyTorchInstalled():
            try:
                names = self.logic.installedModels()
            except Exception as error:  # a broken model manifest must not break the module panel
                logging.warning(f"AttentionSeg: could not list the installed models: {error}")
        wanted = self._parameterNode.modelName if self._parameterNode else ""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.addItem(CHECKPOINT_ENTRY)
        index = combo.findText(wanted) if wanted else -1
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(wasBlocked)
        self.onModelChanged(combo.currentText)

    def _onServer(self) -> bool:
        return bool(self._parameterNode and self._parameterNode.computeOn == SERVER)

    def _server(self) -> tuple[str, str | None] | None:
        """``(url, token)`` when the engine runs on a server, else None."""
        if not self._onServer():
            return None
        url = self.ui.serverUrlLineEdit.text.strip() or DEFAULT_SERVER_URL
        return url, self.ui.serverTokenLineEdit.text.strip() or None

    def onServerURLChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.serverURL = self.ui.serverUrlLineEdit.text.strip() or DEFAULT_SERVER_URL

    def onServerTokenChanged(self) -> None:
        qt.QSettings().setValue(SERVER_TOKEN_SETTING, self.ui.serverTokenLineEdit.text.strip())

    def onTestConnection(self) -> bool:
        """Ask the server who it is and which models it has; a failure is shown and changes nothing in the
        scene. True when connected."""
        self.onServerURLChanged()
        url, token = self._server() or (DEFAULT_SERVER_URL, None)
        try:
            with slicer.util.WaitCursor():
                health, models = self.logic.testConnection(url, token)
        except Exception as error:
            self.ui.statusLabel.text = _("No connection to {url}.").format(url=url)
            message = _("Could not connect to the AttentionSeg server at {url}:\n{error}")
            slicer.util.errorDisplay(message.format(url=url, error=error))
            return False
        self._serverModels = models
        self._refreshModelList()
        self.ui.statusLabel.text = _("Connected to {url}: device {device}, {sessions} of {maximum} sessions "
                                     "open, {count} models.").format(
            url=url, device=health.get("device"), sessions=health.get("sessions"),
            maximum=health.get("max_sessions"), count=len(models))
        return True

    def onModelChanged(self, text: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelName = text
        self._updateGUI()

    def _selectedModel(self) -> str:
        if self.ui.modelComboBox.currentText != CHECKPOINT_ENTRY:
            return self.ui.modelComboBox.currentText
        path = self._parameterNode.checkpointPath
        if not path or not pathlib.Path(path).is_file():
            raise ValueError(_("Choose an installed model, or a checkpoint file that exists."))
        return str(path)

    def _targetSegmentID(self) -> str:
        segmentId = self.ui.targetSegmentSelector.currentSegmentID()
        if not segmentId:
            raise ValueError(_("Choose a target segment first."))
        return segmentId

    def onTargetSegmentChanged(self, segmentId: str) -> None:
        if self._parameterNode:
            self._parameterNode.targetSegmentID = segmentId or ""

    # -- jobs ------------------------------------------------------------------------------------------------
    def _watch(self, job: Job | None, onSuccess: Callable[[Job], None] | None = None) -> None:
        """Show a job's progress until it finishes; ``onSuccess`` runs after its result was applied."""
        if job is None:
            return
        if onSuccess is not None:
            self._onSuccess[job] = onSuccess
        self.ui.statusLabel.text = _("{name}: running...").format(name=job.name)
        self._pollTimer.start()
        self._updateGUI()

    def onPoll(self) -> None:
        if not self.logic.hasController:  # the scene was closed while work was running
            self._pollTimer.stop()
            return
        controller = self.logic.controller
        for job in controller.poll():
            callback = self._onSuccess.pop(job, None)
            if job.state is JobState.FAILED:
                self.ui.statusLabel.text = job.error_message
                unchanged = _("Your segments and scribbles were not changed.")
                slicer.util.errorDisplay(f"{job.error_message}\n\n{unchanged}", detailedText=job.traceback)
            elif job.state is JobState.CANCELLED:
                self.ui.statusLabel.text = _("{name} cancelled; nothing was changed.").format(name=job.name)
            else:
                strategy = controller.refine_strategy
                # the user sees how the engine learnt from the scribbles
                if job.name == "Refine" and strategy:
                    self.ui.statusLabel.text = _("Refine done ({strategy}).").format(strategy=strategy)
                else:
                    self.ui.statusLabel.text = _("{name} done.").format(name=job.name)
                # what the model is unsure of, and what to do (LiteMedSAM's predicted IoU)
                for segment, note in controller.unsure.items():
                    self.ui.statusLabel.text += f" {segment}: {note}."
                # what the step did that the user would not expect (a click's answer chosen again)
                for segment, note in controller.notes.items():
                    self.ui.statusLabel.text += f" {segment}: {note}."
                if callback is not None:
                    callback(job)
        current = controller.current_job
        if current is None:
            self._pollTimer.stop()
            self.ui.progressBar.value = 0
            if self._watchedSliceNode is not None:
                self._prefetchTimer.start()  # a job stopped the preparing: go on with the slices left
        else:
            self.ui.progressBar.value = int(round(100 * current.progress))
            if current.message:
                self.ui.statusLabel.text = f"{current.name}: {current.message}"
        self._updateGUI()

    def onCancel(self) -> None:
        self.logic.controller.cancel()

    # -- session ---------------------------------------------------------------------------------------------
    def onStartSession(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start the AttentionSeg session."), waitCursor=True):
            pn = self._parameterNode
            if self._onServer() and not self._serverModels and not self.onTestConnection():
                return  # the server's models are not known yet, and it cannot be reached: said already
            self.onServerURLChanged()
            options = parse_model_options(self.ui.modelOptionsLineEdit.text)
            job = self.logic.startSession(pn.inputVolume, self._selectedModel(), device=pn.device,
                                          segmentationNode=pn.outputSegmentation,
                                          scribbleNode=pn.scribbleSegmentation, server=self._server(),
                                          **({"model_options": options} if options else {}))
            if job is None:
                self.ui.statusLabel.text = _("AttentionSeg needs PyTorch; the session was not started.")
                return
            self._refreshModelList()
            self._watch(job, self._onSessionStarted)

    def _onSessionStarted(self, job: Job) -> None:
        controller = self.logic.controller
        self._parameterNode.outputSegmentation = controller.segmentation_node
        self._parameterNode.scribbleSegmentation = controller.scribble_node
        self.ui.targetSegmentSelector.setCurrentNode(controller.segmentation_node)
        if controller.refine_strategy:
            self.ui.refineButton.toolTip = _("Learn from the scribbles ({strategy} on this device).").format(
                strategy=controller.refine_strategy)
        labels = mrml.labelled_segments(controller.segmentation_node)
        if labels:
            self.ui.targetSegmentSelector.setCurrentSegmentID(labels[min(labels)])
        editor = self.ui.scribbleEditorWidget
        editor.setSegmentationNode(controller.scribble_node)
        editor.setSourceVolumeNode(controller.volume_node)
        slicer.util.setSliceViewerLayers(background=controller.volume_node, fit=True)
        self._watchSliceView()

    # -- preparing the slice in view for a click (LiteMedSAM) ------------------------------------------------
    def _watchSliceView(self) -> None:
        """With a model that prepares for clicks, prepare the slice the red (axial) view shows whenever the
        view rests on one (:meth:`SegmentationController.prefetch_slice`)."""
        if self._watchedSliceNode is not None:
            self.removeObserver(self._watchedSliceNode, vtk.vtkCommand.ModifiedEvent,
                                self.onSliceViewModified)
            self._watchedSliceNode = None
        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        if not self.logic.controller.prefetches or sliceWidget is None:
            return
        self._watchedSliceNode = sliceWidget.mrmlSliceNode()
        self.addObserver(self._watchedSliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)
        self._prefetchTimer.start()

    def onSliceViewModified(self, caller: Any, event: Any) -> None:
        # The view moves: the slices around its last rest may not be the ones to prepare any more, and the
        # cores are the view's meanwhile.
        if self.logic.hasController:
            self.logic.controller.cancel_prefetch()
        self._prefetchTimer.start()  # (re)started: the slice is prepared once the view rests

    def onPrepareSlicesToggled(self, checked: bool) -> None:
        if not checked and self.logic.hasController:
            self.logic.controller.cancel_prefetch()
        elif checked and self._watchedSliceNode is not None:
            self._prefetchTimer.start()

    def onPrefetch(self) -> None:
        if self._watchedSliceNode is None or not self.logic.hasController:
            return
        if self._parameterNode is not None and not self._parameterNode.prepareSlices:
            return
        try:
            self.logic.controller.prefetch_slice(self._watchedSliceNode)
        except Exception:  # preparing is a courtesy to the next click: it never interrupts the user
            logging.exception("AttentionSeg: could not prepare the slice in view")

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not segment the volume.")):
            self._watch(self.logic.controller.segment())

    # -- clicks ----------------------------------------------------------------------------------------------
    def onPlacePoints(self, positive: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start placing points.")):
            self._targetSegmentID()  # fail early, before the user starts clicking
            pointList = self.logic.controller.point_list(positive)
            if pointList not in self._observedPointLists:
                self.addObserver(pointList, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                 self.onPointPlaced)
                self._observedPointLists.append(pointList)
            markupsLogic = slicer.modules.markups.logic()
            markupsLogic.SetActiveList(pointList)
            markupsLogic.StartPlaceMode(True)  # persistent: every click in a view places a point

    def onPointPlaced(self, caller: Any, event: Any) -> None:
        index = caller.GetNumberOfControlPoints() - 1
        positive = caller.GetID() == self.logic.controller.point_list(True).GetID()
        try:
            job = self.logic.controller.click_control_point(caller, index, segment_id=self._targetSegmentID(),
                                                            positive=positive)
        except Exception as error:  # refused before any work: the point is not kept
            caller.RemoveNthControlPoint(index)
            slicer.util.errorDisplay(_("Click ignored: {error}").format(error=error))
            return
        self._watch(job)

    def onClearPoints(self) -> None:
        for positive in (True, False):
            self.logic.controller.point_list(positive).RemoveAllControlPoints()

    # -- boxes (box-prompted models such as medsam_lite) -----------------------------------------------------
    def _placeRoi(self, roi: Any, name: str, onPlaced: Callable[[Any, Any], None]) -> Any:
        """Start placing ``roi`` (a markups ROI, created on first use) in a slice view; ``onPlaced`` runs once
        it is placed and whenever it is moved. A new placement replaces the old ROI. Returns the node."""
        if roi is None or slicer.mrmlScene.GetNodeByID(roi.GetID()) is None:
            roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
            roi.CreateDefaultDisplayNodes()
            for event in (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                          slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent):
                self.addObserver(roi, event, onPlaced)
        else:
            roi.RemoveAllControlPoints()
        markupsLogic = slicer.modules.markups.logic()
        markupsLogic.SetActiveList(roi)
        markupsLogic.StartPlaceMode(False)
        return roi

    def _onRoiPlaced(self, caller: Any, submit: Callable[..., Job], what: str) -> None:
        """Submit ``submit(roi, segment_id=...)`` once the ROI is placed (not while it is being drawn)."""
        placed = getattr(caller, "GetControlPointPlacementComplete", None)
        if caller.GetNumberOfControlPoints() < 1 or (placed is not None and not placed()):
            return  # still being drawn
        try:
            job = submit(caller, segment_id=self._targetSegmentID())
        except Exception as error:  # refused before any work (a box without area, outside the volume)
            slicer.util.errorDisplay(_("{what} ignored: {error}").format(what=what, error=error))
            return
        self._watch(job)

    def onDrawBox(self) -> None:
        """Place a markups ROI in a slice view; once placed (and whenever it is moved), segment in it."""
        with slicer.util.tryWithErrorDisplay(_("Could not start drawing a box.")):
            self._targetSegmentID()  # fail early, before the user starts drawing
            self._boxNode = self._placeRoi(self._boxNode, "AttentionSeg box", self.onBoxPlaced)

    def onBoxPlaced(self, caller: Any, event: Any) -> None:
        self._onRoiPlaced(caller, self.logic.controller.box_from_roi, _("Box"))

    def onDrawBounds(self) -> None:
        """Place a second markups ROI (its own node: moving it never re-prompts the box); once placed, and
        whenever it is moved or resized, the target segment is kept inside it (slices included)."""
        with slicer.util.tryWithErrorDisplay(_("Could not start drawing the bounds.")):
            self._targetSegmentID()
            self._boundsNode = self._placeRoi(self._boundsNode, "AttentionSeg bounds", self.onBoundsPlaced)

    def onBoundsPlaced(self, caller: Any, event: Any) -> None:
        self._onRoiPlaced(caller, self.logic.controller.bound_to_roi, _("Bounds"))

    # -- scribbles -------------------------------------------------------------------------------------------
    def _setupScribbleEditor(self) -> None:
        editor = self.ui.scribbleEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.setEffectNameOrder(["Paint", "Erase"])
        editor.unorderedEffectsVisible = False
        self._ensureScribbleEditorNode()

    def _ensureScribbleEditorNode(self) -> None:
        node = slicer.mrmlScene.GetSingletonNode(SCRIBBLE_EDITOR_NODE_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SCRIBBLE_EDITOR_NODE_TAG)
            node = slicer.mrmlScene.AddNode(node)
        self._scribbleEditorNode = node
        self.ui.scribbleEditorWidget.setMRMLSegmentEditorNode(node)

    def onPaintScribbles(self, foreground: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not start painting scribbles.")):
            controller = self.logic.controller
            segmentId = controller.scribble_segment(self._targetSegmentID() if foreground else None)
            editor = self.ui.scribbleEditorWidget
            editor.setSegmentationNode(controller.scribble_node)
            editor.setSourceVolumeNode(controller.volume_node)
            editor.setCurrentSegmentID(segmentId)
            editor.setActiveEffectByName("Paint")

    def onEraseScribbles(self) -> None:
        self.ui.scribbleEditorWidget.setActiveEffectByName("Erase")

    # -- refine, history, locks ------------------------------------------------------------------------------
    def onRefine(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not refine.")):
            self.ui.scribbleEditorWidget.setActiveEffect(None)  # finish the stroke in progress
            self._watch(self.logic.controller.refine(self._parameterNode.timeBudgetS))

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not undo.")):
            self._watch(self.logic.controller.undo())

    def onRedo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not redo.")):
            self._watch(self.logic.controller.redo())

    def onLockToggled(self, locked: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not change the lock.")):
            controller = self.logic.controller
            segmentIds = [self._targetSegmentID()]
            self._watch(controller.lock(segmentIds) if locked else controller.unlock(segmentIds))

    # -- overlays --------------------------------------------------------------------------------------------
    def onShowAttention(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the attention maps.")):
            self._watch(self.logic.controller.show_attention(self._colorMapOrNone()), self._onAttentionShown)

    def _onAttentionShown(self, job: Job) -> None:
        names = sorted(job.result())
        combo = self.ui.attentionGateComboBox
        current = combo.currentText
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.setCurrentIndex(max(combo.findText(current), 0))
        combo.blockSignals(wasBlocked)
        self.onGateChanged(combo.currentText)

    def onGateChanged(self, name: str) -> None:
        node = self.logic.controller.overlay_nodes.get(name) if self.logic.hasController else None
        if node is not None:
            self._showOverlay(node)

    def onShowUncertainty(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the uncertainty.")):
            self._watch(self.logic.controller.show_uncertainty(self._colorMapOrNone()),
                        lambda job: self._showOverlay(self.logic.controller.overlay_nodes["uncertainty"]))

    def _colorMapOrNone(self) -> str | None:
        """The chosen colour map when this Slicer has it (file-based maps may be missing in custom builds)."""
        name = self._parameterNode.overlayColorMap
        try:
            mrml.color_node_id(slicer.mrmlScene, name)
        except ValueError:
            logging.warning(f"AttentionSeg: colour map {name} is not available; keeping the default")
            return None
        return name

    def _showOverlay(self, node: Any) -> None:
        slicer.util.setSliceViewerLayers(background=self.logic.controller.volume_node, foreground=node,
                                         foregroundOpacity=self._parameterNode.overlayOpacity)

    def _applyOverlayDisplay(self) -> None:
        """Opacity and colour-map changes apply at once to what is shown."""
        if not (self.logic and self.logic.hasController and self.logic.controller.overlay_nodes):
            return
        controller = self.logic.controller
        colorMap = self._colorMapOrNone()
        if colorMap:
            controller.set_overlay_color_map(colorMap)
        overlayIds = {node.GetID() for node in controller.overlay_nodes.values()}
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
            if composite.GetForegroundVolumeID() in overlayIds:  # leave other foreground volumes alone
                composite.SetForegroundOpacity(self._parameterNode.overlayOpacity)

    def onHideOverlay(self) -> None:
        slicer.util.setSliceViewerLayers(foreground=None)

    # -- files -----------------------------------------------------------------------------------------------
    def onSaveModel(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save adapted model"),
                                              "adapted_model.pt", _("AttentionSeg checkpoint (*.pt)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not save the model.")):
            self._watch(self.logic.controller.save_model(path))

    def onExportSegmentation(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export segmentation"), "segmentation.seg.nrrd",
            _("Segmentation (*.seg.nrrd);;Label map (*.nii.gz *.nrrd)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not export the segmentation."), waitCursor=True):
            written = self.logic.controller.export_segmentation(path)
            self.ui.statusLabel.text = _("Segmentation written to {path}").format(path=written)


#
# AttentionSegLogic
#


class AttentionSegLogic(ScriptedLoadableModuleLogic):
    """Owns the workflow (:class:`~AttentionSegController.SegmentationController`) and PyTorch's installation.

    Usable from the Python console without the GUI::

        logic = slicer.util.getModuleLogic("AttentionSeg")
        job = logic.startSession(volumeNode, "demo_abdomen_ct")
        logic.controller.wait(job, idle=slicer.app.processEvents)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._controller: SegmentationController | None = None
        self._computeOn: tuple[str, ...] = ()  # where the engine runs: () here, (url, token) on a server

    def getParameterNode(self) -> AttentionSegParameterNode:
        return AttentionSegParameterNode(super().getParameterNode())

    @property
    def hasController(self) -> bool:
        return self._controller is not None

    @property
    def controller(self) -> SegmentationController:
        if self._controller is None:
            raise RuntimeError(_("No AttentionSeg session has been started yet."))
        return self._controller

    @staticmethod
    def pyTorchInstalled() -> bool:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            return False
        return bool(PyTorchUtils.PyTorchUtilsLogic.torchInstalled())

    def ensurePyTorch(self, askUser: bool = True) -> bool:
        """Make ``torch`` importable through the PyTorch extension; the user confirms the download first.

        Returns:
            False when the user declined the installation.

        Raises:
            RuntimeError: the PyTorch extension is not installed.
        """
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(_("AttentionSeg needs the PyTorch extension: install 'PyTorch' from the "
                                 "Extensions Manager and restart Slicer.")) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        return torchLogic.installTorch(askConfirmation=askUser) is not None

    @staticmethod
    def installedModels() -> list[str]:
        """Names of the models the engine finds (bundled, ATTENTIONSEG_MODEL_PATH, the user folder)."""
        from AttentionSegLib import available_models

        return sorted(available_models())

    @staticmethod
    def testConnection(url: str, token: str | None = None) -> tuple[dict[str, Any], list[str]]:
        """The server's health and its model names; raises with a readable message when it cannot be reached
        or refuses the token (waits at most CONNECTION_TIMEOUT_S)."""
        backend = RemoteBackend(url, token, timeout=CONNECTION_TIMEOUT_S)
        try:
            return backend.check_connection(), backend.models()
        finally:
            backend.shutdown()

    def startSession(self, volumeNode: Any, model: Any, device: str = "auto", segmentationNode: Any = None,
                     scribbleNode: Any = None, askUser: bool = True,
                     server: tuple[str, str | None] | None = None, **sessionOptions: Any) -> Job | None:
        """Open an interactive session; returns its job, or None when PyTorch is missing and not installed.

        Args:
            server: ``(url, token)`` to run the engine on an ``attentionseg serve`` machine (PyTorch is
                then not needed here); None runs it in Slicer.
        """
        computeOn = tuple(server) if server else ()
        if not computeOn and not self.ensurePyTorch(askUser=askUser):
            return None
        if self._controller is not None and computeOn != self._computeOn:
            self.close()  # the old engine goes; segments, scribbles and overlays stay in the scene
        if self._controller is None:
            backend = RemoteBackend(*computeOn) if computeOn else None
            self._controller = SegmentationController(slicer.mrmlScene, backend=backend)
            self._computeOn = computeOn
        return self._controller.start(volumeNode, model, device=device, segmentation_node=segmentationNode,
                                      scribble_node=scribbleNode, **sessionOptions)

    def close(self) -> None:
        """Stop the engine (pending work is cancelled); segments, scribbles and overlays stay in the scene."""
        if self._controller is not None:
            self._controller.close()
            self._controller = None


#
# AttentionSegTest
#


class AttentionSegTest(ScriptedLoadableModuleTest):
    """The click-scribble-refine workflow inside Slicer, on a synthetic abdominal CT phantom.

    The same workflow is tested in CI on the bare Slicer core (``Testing/slicer``); this test adds what only
    the application has: ``slicer.mrmlScene``, the PyTorch extension and Qt event processing while jobs run.
    """

    SMALL_NETWORK = {
        "name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 8,
        "filters": [4, 8, 16, 32],
        "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160, 240]}, "spacing": None,
                          "patch_size": [16, 32, 32]},
    }

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ClickScribbleRefine()

    def _wait(self, logic: AttentionSegLogic, job: Job) -> Job:
        logic.controller.wait(job, timeout=600, idle=slicer.app.processEvents)
        self.assertEqual(job.state, JobState.SUCCEEDED, job.error_message)
        return job

    def test_ClickScribbleRefine(self) -> None:
        self.delayDisplay("Starting the AttentionSeg workflow test")
        from AttentionSegLib import make_abdominal_phantom

        image, labels, names = make_abdominal_phantom(shape=(32, 64, 64), seed=3)
        pancreasLabel = next(label for label, name in names.items() if name == "pancreas")
        volumeNode = mrml.add_volume_node(slicer.mrmlScene, image, "phantom")
        network = dict(self.SMALL_NETWORK, labels=names)

        logic = AttentionSegLogic()
        started = time.monotonic()
        job = logic.startSession(volumeNode, network, device="cpu", askUser=False)
        self.assertIsNotNone(job, "PyTorch is not available")
        self._wait(logic, job)
        controller = logic.controller
        segmentId = mrml.labelled_segments(controller.segmentation_node)[pancreasLabel]
        self.delayDisplay(f"Session started in {time.monotonic() - started:.1f} s")

        # click: a control point in RAS at the pancreas -> the pancreas segment, on the volume's grid
        voxels = np.argwhere(labels.array == pancreasLabel)
        k, j, i = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
        points = controller.point_list(True)
        index = points.AddControlPoint(vtk.vtkVector3d(*image.ijk_to_ras([float(i), float(j), float(k)])))
        self._wait(logic, controller.click_control_point(points, index, segment_id=segmentId, positive=True))
        clicked = mrml.read_segment(controller.segmentation_node, segmentId, volumeNode)
        self.assertTrue(clicked[k, j, i])

        # scribbles -> refine: the segment changes and the scribbles stay as painted
        foreground = np.zeros(clicked.shape, bool)
        foreground[k] = labels.array[k] == pancreasLabel
        background = np.zeros(clicked.shape, bool)
        background[k] = (labels.array[k] != pancreasLabel) & (labels.array[k] > 0)
        scribbles = controller.scribble_node
        mrml.write_segment(scribbles, controller.scribble_segment(segmentId), foreground, volumeNode)
        mrml.write_segment(scribbles, controller.scribble_segment(None), background, volumeNode)
        painted = controller.scribble_map()
        self._wait(logic, controller.refine(time_budget_s=2.0))
        refined = mrml.read_segment(controller.segmentation_node, segmentId, volumeNode)
        self.assertFalse(np.array_equal(refined, clicked))
        self.assertTrue(np.array_equal(controller.scribble_map(), painted))

        # attention overlay on the input's grid
        self._wait(logic, controller.show_attention("Inferno"))
        for node in controller.overlay_nodes.values():
            self.assertTrue(mrml.same_grid(node, volumeNode))

        # export and re-import
        path = pathlib.Path(slicer.app.temporaryPath) / "AttentionSegTest.seg.nrrd"
        controller.export_segmentation(path)
        reloaded = mrml.load_segmentation(slicer.mrmlScene, path)
        np.testing.assert_array_equal(mrml.segments_to_label_array(reloaded, volumeNode),
                                      mrml.segments_to_label_array(controller.segmentation_node, volumeNode))
        logic.close()
        self.delayDisplay("Test passed")
