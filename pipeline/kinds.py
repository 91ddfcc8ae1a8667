"""Output kinds as objects: what a region job of each kind produces and which stages run after inference.

The job spec maps ``output.kind`` to one of these once (:func:`get_kind`); from then on nothing compares kind names.
A kind declares:

* ``product``: what its channels are. ``continuous`` (embeddings, regression: a value per channel) or ``classes``
  (one score per class: the mosaic adds a class map, COGs get a colour table, quicklooks a legend). Written into
  the tile store's attributes, so the mosaic and quicklook stages read it from there, not from the kind's name;
* ``periods``: how many time periods its model takes (change detection compares two);
* ``takes_classes`` and the default class names of a class product;
* :meth:`OutputKind.task`: the task model (backbone + head, :mod:`pipeline.model.heads`) that computes it;
* :meth:`OutputKind.post_stages`: the stages after inference (:mod:`pipeline.job.stages`).

Adding a kind (classification, detection, regression) is one subclass here, its head and the writer of its
outputs as a stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pipeline.palette import default_colors

if TYPE_CHECKING:
    from pipeline.job.stages import Stage
    from pipeline.model.heads import TaskModel
    from pipeline.model.skysense import SkySenseV2

Product = Literal["continuous", "classes"]


class OutputKind:
    """Base of the output kinds (stateless; one instance per kind in :data:`KINDS`)."""

    name: ClassVar[str]
    product: ClassVar[Product]
    periods: ClassVar[int] = 1
    takes_classes: ClassVar[bool] = False
    default_class_names: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<output kind {self.name!r}>"

    def task(
        self, model: SkySenseV2, num_classes: int | None = None, class_names: list[str] | None = None
    ) -> TaskModel:
        """The (untrained-head) task model of this kind around ``model``."""
        raise NotImplementedError

    def post_stages(self) -> list[type[Stage]]:
        """Stage classes that run after inference, in order."""
        raise NotImplementedError

    def class_names(self, num_classes: int | None, given: list[str] | None) -> list[str] | None:
        """Class names of this kind's output (``None`` for continuous products).

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
    """The fused embedding map: mosaic, COG, an int8 embedding archive, a PCA quicklook."""

    name = "embeddings"
    product = "continuous"

    def task(self, model, num_classes=None, class_names=None):  # noqa: D102
        from pipeline.model.heads import EmbeddingTask

        return EmbeddingTask(model)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import ArchiveStage, CogStage, MosaicStage, QuicklookStage

        return [MosaicStage, CogStage, ArchiveStage, QuicklookStage]


class Segmentation(OutputKind):
    """Per-pixel class scores: mosaic, score COG, class-map COG with a colour table, quicklook with legend."""

    name = "segmentation"
    product = "classes"
    takes_classes = True

    def task(self, model, num_classes=None, class_names=None):  # noqa: D102
        from pipeline.model.heads import SegmentationTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return SegmentationTask(model, len(names), names)

    def post_stages(self):  # noqa: D102
        from pipeline.job.stages import ClassMapStage, CogStage, MosaicStage, QuicklookStage

        return [MosaicStage, CogStage, ClassMapStage, QuicklookStage]


class Change(Segmentation):
    """Bi-temporal change classes from a before and an after period (siamese head)."""

    name = "change"
    periods = 2
    default_class_names = ("no_change", "change")

    def task(self, model, num_classes=None, class_names=None):  # noqa: D102
        from pipeline.model.heads import ChangeTask

        names = self.class_names(num_classes, class_names)
        assert names is not None
        return ChangeTask(model, len(names), names)


KINDS: dict[str, OutputKind] = {k.name: k() for k in (Embeddings, Segmentation, Change)}
"""Every output kind by name."""


def get_kind(name: str | OutputKind) -> OutputKind:
    """The kind called ``name`` (a kind passes through), with a clear error listing the known ones."""
    if isinstance(name, OutputKind):
        return name
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown output kind {name!r}; choose one of {sorted(KINDS)}") from None
