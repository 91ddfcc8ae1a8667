"""Fine-tuning: labelled data -> a trained task head (and optionally adapted backbone) -> a checkpoint region jobs use.

``skypipe finetune SPEC.yaml`` (:mod:`.spec`, :mod:`.loop`) trains one task of :mod:`pipeline.kinds` on labelled
data read by the adapters of :mod:`.data`; the metrics (:mod:`pipeline.eval.metrics`) are the ones ``skypipe eval``
reports; the checkpoint carries the task, its classes and colours, label nodata, the input bands and normalisation,
the data provenance and the validation metrics (:mod:`.checkpoint`).
"""
