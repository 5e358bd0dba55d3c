"""Elastic submodels (ELMS): one set of weights reordered by importance so that every smaller
submodel is a prefix of each weight matrix; a request picks its level per step.

    spec.py          ElasticSpec: the levels and the widths each keeps per layer (no torch, no I/O)
    torch_model.py   a plain fp32, differentiable Llama forward at any level (selections,
                     corrections, activation capture): what elastification and distillation compute on
    calibration.py   calibration conversations (ShareGPT, chat template) and the held-out dev set
    importance.py    first-order Taylor importance of FFN neurons and query heads; the orders
    anchors.py       anchor layers by single-layer ablation
    allocation.py    per-layer widths of every level from importance (or uniform)
    recovery.py      closed-form recovery: per-level bias and rank-r ridge correction per block
    permutation.py   the weights reordered so each level is a prefix (dense and quantized blocks)
    checkpoint.py    the elastic checkpoint on disk (spec.json + elastic.safetensors), its cache dir
    quality.py       perplexity and top-1 agreement of a level against the full model
    quality_table.py the measured quality of each level and prompt_keep, which the SLO policy's
                     choice ranks settings by (no torch: the scheduler reads it)
    elastify.py      the orchestrator (`engine elastify`): resumable stages, progress bars
    distill.py       distillation recovery (`engine elastify --distill`): each level's terms trained
                     on logit KL from the full model under a wall-clock budget, resumable per level
    teacher_targets.py  the full model's distributions cached as top-k log-probs; the bucketed KL
    adapters.py      adapters.safetensors: distilled terms that replace the closed-form ones
"""
