"""Output kinds as objects: what a model of each kind produces, how it is trained, what a region job writes.

The job spec and the fine-tuning spec map a kind's name to one of these once (:func:`get_kind`); from then on
nothing compares kind names. A kind declares:

* ``product``: what its outputs are, written into the tile store's attributes so that the mosaic and quicklook stages
  read it from there: ``continuous`` (embeddings, regression: a value per channel), ``classes`` (per-pixel class
  probabilities: the mosaic adds a class map, COGs get a colour table, quicklooks a legend), ``tile_classes`` (one
  class-probability vector per inference tile), ``tile_labels`` (independent per-class probabilities per tile) or
  ``boxes`` (scored, classed object boxes per tile, merged across tiles into one table);
* ``periods``: how many time periods its model takes (change detection compares two);
* ``takes_classes``, ``multi_label`` and the default class names;
* ``fine_output``: dense outputs at the finest input resolution (HR maps for HR inputs) instead of the 10 m grid;
* :meth:`OutputKind.task`: the task model (backbone + head, :mod:`pipeline.model.heads`) that computes it;
* :meth:`OutputKind.activate`: scores -> what is stored (softmax for classes, sigmoid for labels);
* :meth:`OutputKind.post_stages`: the stages after inference (:mod:`pipeline.job.stages`);
* ``default_loss`` and ``metric_task``: how fine-tuning trains it (:mod:`pipeline.finetune.losses`) and which
  metrics score it (:mod:`pipeline.eval.metrics`).

Adding a kind is one subclass here, its head, and the writer of its outputs as a stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pipeline.palette import default_colors

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.job.stages import Stage
    from pipeline.model.heads import TaskModel
    from pipeline.model.skysense import SkySenseV2

Product = Literal["continuous", "classes", "tile_classes", "tile_labels", "boxes"]


class OutputKind:
    """Base of the output kinds (stateless; one instance per kind in :data:`KINDS`)."""

    name: ClassVar[str]
    product: ClassVar[Product]
    periods: ClassVar[int] = 1
    takes_classes: ClassVar[bool] = False
    multi_label: ClassVar[bool] = False
    fine_output: ClassVar[bool] = False
    trainable: ClassVar[bool] = True
    default_class_names: ClassVar[tuple[str, ...]] = ()
    default_loss: ClassVar[str] = "ce"
    metric_task: ClassVar[str] = ""

    def __repr__(self) -> str:
        return f"<output kind {self.name!r}>"

    def task(
        self, model: SkySenseV2, num_classes: int | None = None, class_names: list[str] | None = None, **head: Any
    ) -> TaskModel:
        """The (untrained-head) task model of this kind around ``model``; ``head`` holds the head's settings."""
        raise NotImplementedError

    def post_stages(self) -> list[type[Stage]]:
        """Stage classes that run after inference, in order."""
        raise NotImplementedError

    def activate(self, scores: Tensor) -> Tensor:
        """Raw head outputs -> the stored values (identity for continuous products)."""
        return scores

    def class_names(self, num_classes: int | None, given: list[str] | None) -> list[str] | None:
        """Class names of this kind's output (``None`` for kinds without classes).

        Raises:
            ValueError: a class product without a class count, or names that do not match the count.
        """
        if not self.takes_classes:
            return None
        names = list(given or self.default_class_names[: num_classes or len(self.default_class_names)])
        n = num_classes or len(names)
        if not n:
            raise ValueError(f"{self.name} needs a number of classes (output.num_classes in the job spec)")
        if names and len(names) != n:
            raise ValueError(f"{len(names)} class names for {n} classes")
        return names or [f"class_{i}" for i in range(n)]

    def store_attrs(self, class_names: list[str] | None, class_colors: list[str] | None = None) -> dict[str, Any]:
        """Tile-store attributes that describe this kind's product to the readers."""
        attrs: dict[str, Any] = {"kind": self.name, "product": self.product, "periods": self.periods}
        if class_names is not None:
            attrs["class_names"] = list(class_names)
            attrs["class_colors"] = list(class_colors or default_colors(len(class_names)))
        return attrs


class Embeddings(OutputKind):
    """The fused embedding map: mosaic, COG, an int8 embedding archive, a PCA quicklook. Not fine-tuned."""

    name = "embeddings"
    product = "continuous"
    trainable = False

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import EmbeddingTask

        return EmbeddingTask(model)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import ArchiveStage, CogStage, MosaicStage, QuicklookStage

        return [MosaicStage, CogStage, ArchiveStage, QuicklookStage]


def _softmax(scores: Tensor) -> Tensor:
    return scores.float().softmax(dim=1)


class Segmentation(OutputKind):
    """Per-pixel class probabilities at the finest input resolution.

    A region job writes the mosaic, a probability COG, a class-map COG with a colour table, a per-class area table,
    the classes' polygons (GeoParquet) and a quicklook with a legend.
    """

    name = "segmentation"
    product = "classes"
    takes_classes = True
    fine_output = True
    metric_task = "segmentation"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import SegmentationTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return SegmentationTask(model, len(names), names, **head)

    def activate(self, scores):  # noqa: D102
        return _softmax(scores)

    def post_stages(self):  # noqa: D102
        from pipeline.job import stages as s

        return [s.MosaicStage, s.CogStage, s.ClassMapStage, s.AreasStage, s.PolygonsStage, s.QuicklookStage]


class Change(Segmentation):
    """Bi-temporal change classes from a before and an after period (siamese head)."""

    name = "change"
    periods = 2
    default_class_names = ("no_change", "change")
    metric_task = "change"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import ChangeTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return ChangeTask(model, len(names), names, **head)


class Regression(OutputKind):
    """Per-pixel values (one or more targets) at the finest input resolution: mosaic, COG, colour-ramp quicklook."""

    name = "regression"
    product = "continuous"
    fine_output = True
    default_loss = "mse"
    metric_task = "regression"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import RegressionTask

        return RegressionTask(model, num_classes or 1, class_names, **head)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import CogStage, MosaicStage, QuicklookStage

        return [MosaicStage, CogStage, QuicklookStage]


class Classification(OutputKind):
    """One scene class per sample; in region jobs one class-probability vector per inference tile."""

    name = "classification"
    product = "tile_classes"
    takes_classes = True
    metric_task = "classification"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import ClassificationTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return ClassificationTask(model, len(names), names, **head)

    def activate(self, scores):  # noqa: D102
        return _softmax(scores)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import TileLabelsStage

        return [TileLabelsStage]


class MultiLabel(Classification):
    """Any number of classes per sample (independent probabilities); in region jobs per inference tile."""

    name = "multilabel"
    product = "tile_labels"
    multi_label = True
    default_loss = "bce"
    metric_task = "multilabel"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import MultiLabelTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return MultiLabelTask(model, len(names), names, **head)

    def activate(self, scores):  # noqa: D102
        return scores.float().sigmoid()


class Detection(OutputKind):
    """Oriented (or horizontal) object boxes per class at the finest input resolution.

    Raw outputs are box predictions (:class:`pipeline.model.heads.DetectionTask`); the actor decodes each tile's
    boxes (score threshold, NMS) into the tile store, and a region job merges them across tiles (a global NMS, so
    an object on a tile border is reported once) into a GeoParquet of oriented polygons, counts per class and a
    quicklook with the boxes drawn over the imagery.
    """

    name = "detection"
    product = "boxes"
    takes_classes = True
    fine_output = True
    default_loss = "detection"
    metric_task = "detection"

    def task(self, model, num_classes=None, class_names=None, **head):  # noqa: D102
        from pipeline.model.heads import DetectionTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return DetectionTask(model, len(names), names, **head)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import DetectionQuicklookStage, DetectionsStage

        return [DetectionsStage, DetectionQuicklookStage]


KINDS: dict[str, OutputKind] = {
    k.name: k() for k in (Embeddings, Segmentation, Change, Regression, Classification, MultiLabel, Detection)
}
"""Every output kind by name."""


def get_kind(name: str | OutputKind) -> OutputKind:
    """The kind called ``name`` (a kind passes through), with a clear error listing the known ones."""
    if isinstance(name, OutputKind):
        return name
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown output kind {name!r}; choose one of {sorted(KINDS)}") from None
