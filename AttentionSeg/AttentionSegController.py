"""The module's workflow: MRML nodes in, engine session calls through the backend, results back into nodes.

This is the body of the module's Logic, kept apart from ``AttentionSeg.py`` so that it imports without
``qt`` or ``slicer.app`` and runs on the bare Slicer core in CI. ``AttentionSegLogic`` owns one
:class:`SegmentationController`; the Widget forwards every button to it and polls
:meth:`~SegmentationController.poll` from a Qt timer.

Two rules shape it:

* **Never block** - everything that touches the network is a backend :class:`~AttentionSegBackend.Job`;
  MRML is read when the work is submitted and written when :meth:`~SegmentationController.poll` sees the job
  succeed, both on the caller's (GUI) thread.
* **Never lose** - a job that fails or is cancelled writes nothing, so the user's segments and scribbles stay
  as they were; scribbles are only ever read; a result rewrites only the segments whose label it changes.

While a click or a box propagates (LiteMedSAM: seconds on a CPU) the structure so far is shown in a node of
its own, :attr:`~SegmentationController.preview_node`, never in the user's segments; it leaves the scene when
the job ends, as its result is written (or not, when it failed or was cancelled).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import AttentionSegMRML as mrml
from AttentionSegBackend import Job, JobState, LocalBackend, SessionBackend, SessionCall

NODE_PREFIX = "AttentionSeg"
PREVIEW_NAME = f"{NODE_PREFIX} preview"
PREVIEW_FILL_OPACITY = 0.3  # the preview's 2D fill, under a full outline: a look, not yet a segment
UNCERTAINTY_NAME = "uncertainty"
BACKGROUND_SCRIBBLE_COLOR = (0.25, 0.55, 1.0)
POSITIVE_POINT_COLOR = (0.1, 0.9, 0.2)
NEGATIVE_POINT_COLOR = (1.0, 0.2, 0.2)

ApplyResult = Callable[[Any], None]
MAX_UNNAMED_LABELS = 32  # a model with more classes and no names segments whatever it is shown


def parse_model_options(text: str) -> dict[str, Any] | None:
    """The *Model options* field: a JSON object of the model's settings (LiteMedSAM's ``MedSAMSettings``
    fields, which the engine checks when the session starts), or ``None`` when empty. ``ValueError`` with
    what is wrong otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Model options are not valid JSON ({exc}); write e.g. "
                         '{"slice_gap_mm": 0}') from None
    if not isinstance(values, dict):
        raise ValueError(f"Model options must be a JSON object of settings, e.g. {{\"slice_gap_mm\": 0}}, "
                         f"not {type(values).__name__}")
    return values


class SegmentationController:
    """The interactive click-scribble-refine workflow on one volume.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in the application).
        backend: where the engine runs; default a :class:`~AttentionSegBackend.LocalBackend`.

    Attributes:
        volume_node: the input volume of the open session.
        segmentation_node: output segments; each carries the engine label it stands for as a tag.
        scribble_node: scribble segments (label 0 = background) painted with the Segment Editor.
        overlay_nodes: ``{map name: scalar volume node}`` of the attention / uncertainty overlays shown.
        preview_node: while a click or a box propagates, a segmentation node showing the structure so far
            (one segment, in the colour of the segment it goes to; not saved with the scene, hidden from node
            selectors); ``None`` otherwise.
        model_labels: ``{label: name}`` the session's model segments (each offered as a segment at start).
        session_facts: the engine session's own description (family, network, device and ``strategy``, how
            Refine learns: ``online_head`` or ``finetune``), from the start; with LiteMedSAM, whose facts
            report the structures it is unsure of (``unsure``), taken again after every step that writes
            the segments (:attr:`unsure`).
    """

    def __init__(self, scene: Any, backend: SessionBackend | None = None) -> None:
        self.scene = scene
        self.backend: SessionBackend = backend if backend is not None else LocalBackend()
        self.volume_node: Any = None
        self.segmentation_node: Any = None
        self.scribble_node: Any = None
        self.overlay_nodes: dict[str, Any] = {}
        self.preview_node: Any = None
        self._previewed: tuple[Job, int] | None = None  # the job and version of the preview shown
        self._points: dict[bool, Any] = {}
        self._mask: np.ndarray | None = None  # the session's mask as last written into the segments
        self._pending: deque[tuple[Job, ApplyResult | None]] = deque()
        self._started = False
        self.model_labels: dict[int, str] = {}
        self.session_facts: dict[str, Any] = {}
        self._prefetch: Job | None = None  # the running "Prepare slices" job (prefetch_slice)
        self._prefetch_voxel: tuple[int, int, int] | None = None

    # -- session ---------------------------------------------------------------------------------------------
    @property
    def session_open(self) -> bool:
        """True once a session has started successfully (its job was polled)."""
        return self._started

    @property
    def busy(self) -> bool:
        """True while submitted jobs have not been polled to completion."""
        return bool(self._pending)

    @property
    def current_job(self) -> Job | None:
        """The oldest unfinished job (the one to show progress for)."""
        return self._pending[0][0] if self._pending else None

    def start(self, volume_node: Any, model: Any, *, device: str = "auto", segmentation_node: Any = None,
              scribble_node: Any = None, **session_options: Any) -> Job:
        """Open an interactive session on ``volume_node`` with ``model`` (name, checkpoint path or config).

        Missing output / scribble segmentation nodes are created; both are given the volume's grid. Every
        label the model segments gets a segment in the output segmentation (named after the model's labels).

        Args:
            session_options: passed on to the engine's ``InteractiveSession`` (e.g. ``settings``).
        """
        volume = mrml.volume_from_node(volume_node)  # validate before touching any node
        name = volume_node.GetName()
        if segmentation_node is None:
            segmentation_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                             f"{name} AttentionSeg")
        if scribble_node is None:
            scribble_node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} scribbles")
        if scribble_node is segmentation_node:
            raise ValueError("the scribble segmentation must differ from the output segmentation")
        mrml.prepare_segmentation(segmentation_node, volume_node)
        mrml.prepare_segmentation(scribble_node, volume_node)

        def opened(description: dict[str, Any]) -> None:
            self.volume_node = volume_node
            self.segmentation_node, self.scribble_node = segmentation_node, scribble_node
            self._mask = np.zeros(volume.shape, dtype=np.uint8)
            self.model_labels = self._offer_model_labels(description)
            self.session_facts = dict(description.get("facts") or {})
            self._started = True

        self.cancel_prefetch()
        self._prefetch = self._prefetch_voxel = None
        job = self.backend.open_session(volume, model, device=device, **session_options)
        self._pending.append((job, opened))
        return job

    # -- clicks ----------------------------------------------------------------------------------------------
    def point_list(self, positive: bool) -> Any:
        """The markups node collecting positive (or negative) clicks, created on first use."""
        node = self._points.get(positive)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            name = f"{NODE_PREFIX} {'positive' if positive else 'negative'} points"
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            color = POSITIVE_POINT_COLOR if positive else NEGATIVE_POINT_COLOR
            node.GetDisplayNode().SetSelectedColor(*color)
            node.GetDisplayNode().SetActiveColor(*color)
            self._points[positive] = node
        return node

    def click(self, point_ras: Sequence[float], *, segment_id: str, positive: bool = True) -> Job:
        """Segment from one click at a world RAS point into the segment ``segment_id``.

        Raises:
            ValueError: the point lies outside the volume (nothing is submitted).
        """
        self._require_session()
        return self._click_voxel(mrml.voxel_index(self.volume_node, point_ras), segment_id, positive)

    def click_control_point(self, markups_node: Any, index: int, *, segment_id: str, positive: bool) -> Job:
        """:meth:`click` at control point ``index`` of a markups node (its world position)."""
        self._require_session()
        voxel = mrml.control_point_voxel(markups_node, index, self.volume_node)
        return self._click_voxel(voxel, segment_id, positive)

    def _click_voxel(self, point_ijk: tuple[int, int, int], segment_id: str, positive: bool) -> Job:
        label = mrml.label_for_segment(self.segmentation_node, segment_id)
        call = SessionCall.click(point_ijk, label=label, positive=positive)
        return self._submit("Click", [call], self._write_mask)

    # -- preparing for a click (LiteMedSAM) ------------------------------------------------------------------
    @property
    def prefetches(self) -> bool:
        """Whether the session's model prepares for clicks while the user looks (LiteMedSAM: it encodes the
        slices around the one shown, 0.25-1 s each on a CPU, which a first click would otherwise wait for)."""
        return self._started and float(self.session_facts.get("prefetch_mm") or 0) > 0

    def prefetch_slice(self, slice_node: Any) -> Job | None:
        """Let the engine prepare for a click on the slice a slice view shows (the Widget calls this when the
        view has settled on a slice). Returns the job, or ``None`` when there is nothing to do: the model
        prepares nothing, other work is pending, the plane misses the volume, or that slice is being (or has
        been) prepared already.

        The job changes no node and is not pending work: it does not hold up :attr:`busy`, and the next
        job submitted (a click) cancels it; what it encoded stays in the engine's cache.
        """
        if not self.prefetches or self._pending:
            return None
        try:
            voxel = mrml.slice_voxel(slice_node, self.volume_node)
        except ValueError:
            return None
        previous = self._prefetch
        if previous is not None and self._prefetch_voxel == voxel and not previous.cancel_requested and \
                previous.state in (JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED):
            return None
        self.cancel_prefetch()
        self._prefetch = self.backend.run("Prepare slices", [SessionCall.prefetch(voxel)])
        self._prefetch_voxel = voxel
        return self._prefetch

    def cancel_prefetch(self) -> None:
        """Stop preparing slices (the engine stops at its next slice)."""
        if self._prefetch is not None and not self._prefetch.done():
            self._prefetch.cancel()

    # -- boxes (box-prompted models such as medsam_lite) -----------------------------------------------------
    def box(self, corner_a_ras: Sequence[float], corner_b_ras: Sequence[float], *, segment_id: str) -> Job:
        """Segment the structure in a box on one axial slice into ``segment_id``: two opposite corners in
        world RAS (R and A of each, the slice of the first); the engine propagates it through the slices.

        Raises:
            ValueError: the box misses the volume or has no area (nothing is submitted).
        """
        self._require_session()
        return self._box_voxels(*mrml.box_voxels(self.volume_node, corner_a_ras, corner_b_ras), segment_id)

    def box_from_roi(self, roi_node: Any, *, segment_id: str) -> Job:
        """:meth:`box` from a markups ROI: its extent in R and A on the axial slice of its centre."""
        self._require_session()
        return self._box_voxels(*mrml.roi_box_voxels(roi_node, self.volume_node), segment_id)

    def box_from_points(self, markups_node: Any, *, segment_id: str) -> Job:
        """:meth:`box` from two clicks: the last two control points of a markups node are opposite corners
        (the box lies on the first of the two's slice).

        Raises:
            ValueError: the node has fewer than two control points (nothing is submitted).
        """
        self._require_session()
        count = markups_node.GetNumberOfControlPoints()
        if count < 2:
            raise ValueError(f"a box needs two points; '{markups_node.GetName()}' has {count}")
        corners = []
        for index in (count - 2, count - 1):
            position = [0.0, 0.0, 0.0]
            markups_node.GetNthControlPointPositionWorld(index, position)
            corners.append(position)
        return self.box(corners[0], corners[1], segment_id=segment_id)

    def _box_voxels(self, corner_a: tuple[int, int, int], corner_b: tuple[int, int, int],
                    segment_id: str) -> Job:
        label = mrml.label_for_segment(self.segmentation_node, segment_id)
        return self._submit("Box", [SessionCall.box(corner_a, corner_b, label=label)], self._write_mask)

    # -- bounds: where a segment may be (a markups ROI) ------------------------------------------------------
    def bound_to_roi(self, roi_node: Any, *, segment_id: str) -> Job:
        """Keep ``segment_id`` inside a markups ROI (its full extent: slices and plane); the engine answers
        again inside it (LiteMedSAM propagates no further) and every later answer stays inside.

        Raises:
            ValueError: the ROI misses the volume (nothing is submitted).
        """
        self._require_session()
        lo, hi = mrml.roi_voxel_bounds(roi_node, self.volume_node)
        label = mrml.label_for_segment(self.segmentation_node, segment_id)
        call = SessionCall.set_bounds(lo, hi, label=label)
        return self._submit("Bounds", [call], self._write_mask)

    def clear_bounds(self, *, segment_id: str) -> Job:
        """Let ``segment_id`` go anywhere again (the segment stays as it is until the next answer)."""
        self._require_session()
        label = mrml.label_for_segment(self.segmentation_node, segment_id)
        return self._submit("Clear bounds", [SessionCall.clear_bounds(label=label)], self._write_mask)

    # -- scribbles and refinement ----------------------------------------------------------------------------
    def scribble_segment(self, segment_id: str | None) -> str:
        """The scribble segment of output segment ``segment_id`` (None: background), created when absent."""
        self._require_session()
        if segment_id is None:
            return mrml.ensure_labelled_segment(self.scribble_node, 0, mrml.scribble_segment_name(0),
                                                BACKGROUND_SCRIBBLE_COLOR)
        label = mrml.label_for_segment(self.segmentation_node, segment_id)
        target = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        return mrml.ensure_labelled_segment(self.scribble_node, label, f"{target.GetName()} scribble",
                                            target.GetColor())

    def scribble_map(self) -> np.ndarray:
        """The current scribbles as the engine's map (255 none, 0 background, k label k)."""
        self._require_session()
        return mrml.scribble_map_from_segments(self.scribble_node, self.volume_node)

    def refine(self, time_budget_s: float) -> Job:
        """Fine-tune the session's network on the painted scribbles for at most ``time_budget_s`` seconds.

        The whole scribble map is sent each time and replaces the engine's scribbles (``replace=True``; the
        clicks' own marks stay), so erased scribbles are gone for the engine too. The scribbles travel inside
        the ``refine`` call, so they are one engine step with it: a refine that fails or is cancelled leaves
        the engine's scribbles, clicks and undo depth as they were, and one Undo takes the whole refine back.

        Raises:
            ValueError: nothing is scribbled, or the budget is not positive (nothing is submitted).
        """
        self._require_session()
        if not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {time_budget_s}")
        scribbles = self.scribble_map()
        if np.all(scribbles == mrml.UNSCRIBBLED):
            raise ValueError("no scribbles yet: paint foreground and background scribbles before refining")
        call = SessionCall.refine(time_budget_s, scribbles=scribbles, replace=True)
        return self._submit("Refine", [call], self._write_mask)

    @property
    def refine_strategy(self) -> str:
        """How Refine learns in this session, in words ("online head", "finetune"; "" before a session)."""
        return str(self.session_facts.get("strategy", "")).replace("_", " ")

    def segment(self) -> Job:
        """Automatic whole-volume segmentation with the session's model."""
        self._require_session()
        return self._submit("Segment", [SessionCall.segment()], self._write_mask)

    def undo(self) -> Job:
        """Step back one edit (mask and network weights)."""
        self._require_session()
        return self._submit("Undo", [SessionCall.undo()], self._write_mask)

    def redo(self) -> Job:
        """Step forward one undone edit."""
        self._require_session()
        return self._submit("Redo", [SessionCall.redo()], self._write_mask)

    def lock(self, segment_ids: Iterable[str]) -> Job:
        """Lock segments: the engine never overwrites them and learns from them what other labels are not."""
        self._require_session()
        labels = sorted(mrml.label_for_segment(self.segmentation_node, sid) for sid in segment_ids)
        return self._submit("Lock", [SessionCall.lock(labels)], None)

    def unlock(self, segment_ids: Iterable[str]) -> Job:
        """Undo :meth:`lock` for these segments."""
        self._require_session()
        labels = sorted(mrml.label_for_segment(self.segmentation_node, sid) for sid in segment_ids)
        return self._submit("Unlock", [SessionCall.unlock(labels)], None)

    # -- overlays --------------------------------------------------------------------------------------------
    def show_attention(self, color_map: str | None = None) -> Job:
        """Compute the attention-gate maps and put each into a scalar volume node on the input's grid."""
        self._require_session()
        return self._submit("Attention maps", [SessionCall.attention_maps()],
                            lambda maps: self._write_overlays(maps, color_map))

    def show_uncertainty(self, color_map: str | None = None) -> Job:
        """Compute the voxel-wise uncertainty (normalised entropy, 0 sure .. 1 undecided) as a volume node."""
        self._require_session()
        return self._submit("Uncertainty", [SessionCall.uncertainty()],
                            lambda unc: self._write_overlays({UNCERTAINTY_NAME: unc}, color_map))

    def set_overlay_color_map(self, color_map: str) -> None:
        """Show every overlay with another colour map."""
        color_id = mrml.color_node_id(self.scene, color_map)
        for node in self.overlay_nodes.values():
            node.GetDisplayNode().SetAndObserveColorNodeID(color_id)

    # -- files -----------------------------------------------------------------------------------------------
    def save_model(self, path: str | os.PathLike[str]) -> Job:
        """Save the adapted network as a checkpoint."""
        self._require_session()
        return self._submit("Save model", [SessionCall.save_model(str(Path(path)))], None)

    def export_segmentation(self, path: str | os.PathLike[str]) -> Path:
        """Write the output segmentation: ``.seg.nrrd`` keeps every segment; an image file gets one label map.

        Label maps (``.nii.gz``, ``.nrrd``, ...) hold each segment's engine label on the input's geometry.
        """
        self._require_session()
        path = Path(path)
        if path.name.endswith(mrml.SEGMENT_FILE_SUFFIX):
            return mrml.save_segmentation(self.segmentation_node, path)
        from AttentionSegLib import write_image

        labels = mrml.segments_to_label_array(self.segmentation_node, self.volume_node)
        return write_image(mrml.volume_from_node(self.volume_node).with_array(labels), path)

    # -- jobs ------------------------------------------------------------------------------------------------
    def poll(self) -> list[Job]:
        """Apply the results of the jobs that finished, in submission order; returns those jobs. Then show the
        running job's preview, if it has a new one (:attr:`preview_node`).

        Call this from the thread that owns the scene (the GUI thread): results are written into MRML here.
        A job whose result cannot be written is marked failed.
        """
        finished: list[Job] = []
        while self._pending and self._pending[0][0].done():
            job, apply = self._pending.popleft()
            if job.state is JobState.SUCCEEDED and apply is not None:
                try:
                    apply(job.result())
                except Exception as error:  # shown to the user like any engine failure
                    job.fail(error)
            finished.append(job)
        self._show_preview()
        return finished

    def wait(self, job: Job, timeout: float | None = None, idle: Callable[[], None] | None = None) -> Job:
        """Poll until ``job`` has been applied (for scripts and tests; the GUI uses a timer instead).

        Args:
            idle: called between polls, e.g. ``slicer.app.processEvents`` to keep the GUI alive.

        Raises:
            TimeoutError: ``job`` did not finish within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if job.done() and all(job is not pending for pending, _ in self._pending):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{job.name} did not finish within {timeout} s")
            if idle is not None:
                idle()
            time.sleep(0.01)

    def cancel(self) -> None:
        """Cancel every pending and running job; none of them changes any node."""
        self.backend.cancel_all()

    def close(self) -> None:
        """Cancel everything and release the engine; nodes stay in the scene (but a preview)."""
        self.backend.shutdown()
        self._pending.clear()
        self._started = False
        self._show_preview()

    # -- internals -------------------------------------------------------------------------------------------
    def _require_session(self) -> None:
        if not self._started:
            raise RuntimeError("no AttentionSeg session is open: choose a volume and a model, then start one")

    def _submit(self, name: str, calls: Sequence[SessionCall], apply: ApplyResult | None) -> Job:
        self.cancel_prefetch()  # the user's work goes first: the engine leaves the slice it prepares
        job = self.backend.run(name, calls)
        if apply == self._write_mask and "unsure" in self.session_facts:
            apply = self._written_then_checked(name)
        self._pending.append((job, apply))
        return job

    def _written_then_checked(self, name: str) -> ApplyResult:
        """Writing a step's mask into the segments, then queueing the session's facts (named as the step),
        which :attr:`unsure` and :attr:`notes` read."""

        def apply(mask: Any) -> None:
            self._write_mask(mask)
            # unknown until the check is back
            self.session_facts = {**self.session_facts, "unsure": {}, "notes": {}}
            self._pending.append((self.backend.run(name, [SessionCall.describe()]), self._take_facts))

        return apply

    def _take_facts(self, facts: Any) -> None:
        self.session_facts = dict(facts or {})

    @property
    def unsure(self) -> dict[str, str]:
        """``{segment name: why and what to do}`` for the segments whose answer the model is unsure of
        (LiteMedSAM: its decoder's predicted IoU, ``MedSAMSettings.unsure_iou``), as of the last step
        applied."""
        return self._by_segment("unsure")

    @property
    def notes(self) -> dict[str, str]:
        """``{segment name: note}`` for the segments that the last step applied changed in a way the user
        would not expect of it (LiteMedSAM: a negative click that chose the first click's answer again)."""
        return self._by_segment("notes")

    def _by_segment(self, fact: str) -> dict[str, str]:
        """The session's ``{label: note}`` fact ``fact`` by segment name (``label N`` where the label has no
        segment)."""
        facts = dict(self.session_facts.get(fact) or {})
        notes = {int(label): str(note) for label, note in facts.items()}
        if not notes or self.segmentation_node is None:
            return {}
        segments = mrml.labelled_segments(self.segmentation_node)
        segmentation = self.segmentation_node.GetSegmentation()
        named = {}
        for label, note in notes.items():
            segment = segmentation.GetSegment(segments[label]) if label in segments else None
            named[segment.GetName() if segment is not None else f"label {label}"] = note
        return named

    def wait_all(self, timeout: float | None = None, idle: Callable[[], None] | None = None) -> None:
        """:meth:`wait` for every job submitted so far and for the checks their results queued."""
        while self._pending:
            self.wait(self._pending[-1][0], timeout, idle)

    def _offer_model_labels(self, description: dict[str, Any]) -> dict[int, str]:
        """Give every label the model segments a segment (named after the model's label) to click into."""
        count = int(description.get("num_classes", 0))
        names = {int(k): str(v) for k, v in dict(description.get("labels", {})).items()}
        if not names and count > MAX_UNNAMED_LABELS:
            count = 2  # a class-agnostic model (LiteMedSAM: any label 1..254): one segment to start with
        labels = {label: names.get(label, f"Label {label}") for label in range(1, count)}
        for label, name in labels.items():
            mrml.ensure_labelled_segment(self.segmentation_node, label, name)
        return labels

    def _write_mask(self, mask: Any) -> None:
        """Write the labels whose voxels changed since the last result into their segments."""
        mask = np.asarray(mask)
        previous = self._mask if self._mask is not None else np.zeros_like(mask)
        if mask.shape != previous.shape:
            raise ValueError(f"the engine returned a mask of shape {mask.shape} for a volume of "
                             f"{previous.shape}")
        labels = {int(v) for v in np.unique(mask)} | {int(v) for v in np.unique(previous)}
        changed = [k for k in sorted(labels - {0}) if not np.array_equal(mask == k, previous == k)]
        mrml.labels_to_segments(self.segmentation_node, self.volume_node, mask, labels=changed)
        self._mask = mask.astype(np.uint8, copy=True)

    def _show_preview(self) -> None:
        """Write the running job's newest preview into :attr:`preview_node` (created on the first), or take
        the node out of the scene when no running job has one. The user's segments are never touched."""
        job = self.current_job
        found = job.preview if job is not None and job.state is JobState.RUNNING else None
        if found is None:
            node = self.preview_node
            if node is not None and self.scene.GetNodeByID(node.GetID()) is not None:
                self.scene.RemoveNode(node)
            self.preview_node, self._previewed = None, None
            return
        version, label, mask = found
        if self._previewed == (job, version):
            return
        node = self.preview_node
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:  # none yet, or the user deleted it
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NAME)
            node.SetSaveWithScene(False)
            node.SetHideFromEditors(True)  # never offered as an output or scribble segmentation
            mrml.prepare_segmentation(node, self.volume_node)
            display = node.GetDisplayNode()
            display.SetOpacity2DFill(PREVIEW_FILL_OPACITY)
            self.preview_node = node
        target = mrml.labelled_segments(self.segmentation_node).get(label)
        source = self.segmentation_node.GetSegmentation().GetSegment(target) if target is not None else None
        name = f"{source.GetName() if source is not None else f'Label {label}'} (preview)"
        color = source.GetColor() if source is not None else None
        segmentation = node.GetSegmentation()
        for other, segment_id in mrml.labelled_segments(node).items():
            if other != label:  # one structure grows at a time
                segmentation.RemoveSegment(segment_id)
        segment_id = mrml.ensure_labelled_segment(node, label, name, color)
        self._previewed = (job, version)  # written once, even if writing fails
        mrml.write_segment(node, segment_id, mask, self.volume_node)

    def _write_overlays(self, maps: dict[str, Any], color_map: str | None) -> None:
        """Attention gates and uncertainty lie in [0, 1]; a fixed window makes their colours comparable."""
        color_id = mrml.color_node_id(self.scene, color_map) if color_map else None
        arrays = {name: np.asarray(array, dtype=np.float32) for name, array in maps.items()}
        for name, array in arrays.items():
            existing = self.overlay_nodes.get(name)
            if existing is not None and self.scene.GetNodeByID(existing.GetID()) is None:
                existing = None  # the user deleted it
            self.overlay_nodes[name] = mrml.overlay_volume_node(
                self.scene, self.volume_node, array, f"{NODE_PREFIX} {name}", color_node_id=color_id,
                value_range=(0.0, 1.0), node=existing)
