"""The built-in merge methods: one entry per method (paper, URL, kind, and where its code lives).

Entries name their config class and function with :class:`Ref` (``"module:attribute"``), so the registry
can be listed (``loramerge methods``, ``--help``) without importing torch; the implementation module is
imported the first time a method runs. To add a built-in method: write its config class and its pure
per-module function in a file of ``loramerge/merging/methods/`` (one file per family), then add an
entry here. Plugins call ``loramerge.register_method`` with the objects themselves.
"""

from __future__ import annotations

from typing import Any

from loramerge.core.rank import RankPolicy
from loramerge.merging.methods.base import MergeMethod, Ref

FACTORWISE_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""The methods with a PEFT factor-wise variant (``factorwise: true``; see methods/factorwise.py)."""

_DARE_PAPER = ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
               "(Yu et al., ICML 2024)")
_DARE_URL = "https://arxiv.org/abs/2311.03099"
_ISO_PAPER = ("No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
              "(Marczak et al., ICML 2025)")
_ISO_URL = "https://arxiv.org/abs/2502.04959"



def _builtin(module: str, fn: str, config: str, *, prepare: str | None = None, **entry: Any) -> MergeMethod:
    """An entry whose function, config class (and prepare pass) live in ``loramerge.merging.methods.<module>``."""
    where = f"loramerge.merging.methods.{module}"
    return MergeMethod(fn=Ref(f"{where}:{fn}"), config_cls=Ref(f"{where}:{config}"),
                       prepare=Ref(f"{where}:{prepare}") if prepare else None, **entry)


BUILTIN_METHODS: tuple[MergeMethod, ...] = (
    _builtin(
        "linear", "task_arithmetic", "TaskArithmeticConfig",
        name="task_arithmetic", aliases=("linear",),
        kind="factored", exact=True,
        paper="Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023)", url="https://arxiv.org/abs/2212.04089",
        summary="lambda * sum of weighted deltas; exact concatenation",
    ),
    _builtin(
        "linear", "average", "AverageConfig",
        name="average", kind="factored", exact=True,
        paper="Model soups (Wortsman et al., ICML 2022)", url="https://arxiv.org/abs/2203.05482",
        summary="weighted mean of the deltas; exact concatenation",
    ),
    _builtin(
        "linear", "cat", "CatConfig",
        name="cat", kind="factored", exact=True, fixed_rank=RankPolicy("exact"),
        paper="PEFT add_weighted_adapter(combination_type='cat')",
        url="https://huggingface.co/docs/peft/main/en/developer_guides/model_merging",
        summary="weighted sum kept as the concatenated LoRA (rank = sum of ranks)",
    ),
    _builtin(
        "elementwise", "ties", "TiesConfig",
        name="ties", kind="elementwise", exact=False,
        paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)",
        url="https://arxiv.org/abs/2306.01708", summary="trim top-k%, elect sign by mass, disjoint mean",
    ),
    _builtin(
        "elementwise", "dare_linear", "DareConfig",
        name="dare_linear", kind="elementwise", exact=False,
        paper=_DARE_PAPER, url=_DARE_URL, summary="random drop + rescale, weighted sum (seeded)",
    ),
    _builtin(
        "elementwise", "dare_ties", "DareTiesConfig",
        name="dare_ties", kind="elementwise", exact=False,
        paper=_DARE_PAPER, url=_DARE_URL, summary="random drop + rescale, TIES sign election (seeded)",
    ),
    _builtin(
        "elementwise", "della", "DellaConfig",
        name="della", kind="elementwise", exact=False,
        paper="DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., 2024)",
        url="https://arxiv.org/abs/2406.11617", summary="MAGPRUNE drop by magnitude rank, elect, weighted fuse (seeded)",
    ),
    _builtin(
        "elementwise", "breadcrumbs", "BreadcrumbsConfig",
        name="breadcrumbs", kind="elementwise", exact=False,
        paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)",
        url="https://arxiv.org/abs/2312.06795", summary="drop outliers and small entries per task, then sum",
    ),
    _builtin(
        "elementwise", "magnitude_prune", "MagnitudePruneConfig",
        name="magnitude_prune", kind="elementwise", exact=False,
        paper="PEFT magnitude_prune (magnitude pruning of task vectors)",
        url="https://huggingface.co/docs/peft/main/en/package_reference/merge_utils",
        summary="keep top-k% magnitudes per task, then weighted sum",
    ),
    _builtin(
        "lego", "lora_lego", "LegoConfig",
        name="lora_lego", kind="factored", exact=False,
        paper="Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise "
        "Clustering (Zhao et al., ICLR 2025)",
        url="https://arxiv.org/abs/2409.16167",
        summary="k-means (k-means++, seeded) over the gauge-canonical rank units of all adapters; "
        "cluster centroids form a rank-k LoRA, with parameter and output reweighting",
        aliases=("lego",),
    ),
    _builtin(
        "spectral", "tsv", "TsvConfig",
        name="tsv", aliases=("tsv_m",), kind="factored", exact=False,
        paper="Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025)",
        url="https://arxiv.org/abs/2412.00081",
        summary="TSV-M: per-task singular vectors, Procrustes-orthogonalised across tasks, singular values kept",
    ),
    _builtin(
        "spectral", "iso_c", "IsoCConfig",
        name="iso_c", kind="factored", exact=False, paper=_ISO_PAPER, url=_ISO_URL,
        summary="flatten the spectrum of the sum to its mean, over the sum's non-zero singular values",
    ),
    _builtin(
        "spectral", "iso_cts", "IsoCtsConfig",
        name="iso_cts", kind="factored", exact=False, paper=_ISO_PAPER, url=_ISO_URL,
        summary="common subspace of the sum plus per-task residual directions, orthogonalised, flat spectrum",
    ),
    _builtin(
        "spectral", "star", "StarConfig",
        name="star", kind="factored", exact=False,
        paper="STAR: Spectral Truncation and Rescale for Model Merging (Lee et al., NAACL 2025)",
        url="https://arxiv.org/abs/2502.10339",
        summary="per task keep eta% of the nuclear norm, rescale to the full norm, then average",
    ),
    _builtin(
        "knots", "knots", "KnotsConfig", prepare="knots_prepare",
        name="knots", kind="factored", exact=False,
        paper="Model merging with SVD to tie the KnOTS (Stoica et al., ICLR 2025)", url="https://arxiv.org/abs/2410.19735",
        summary="joint SVD of the module's adapters, then TIES / DARE / task arithmetic on the aligned coordinates",
    ),
    _builtin(
        "adamerging", "adamerging", "AdaMergingConfig",
        name="adamerging", kind="factored", exact=True, data="prompts",
        paper="AdaMerging: Adaptive Model Merging for Multi-Task Learning (Yang et al., ICLR 2024)",
        url="https://arxiv.org/abs/2310.02575",
        summary="task- and layer-wise coefficients learned by entropy minimisation on unlabeled prompts; exact",
    ),
    # Issue 11: data-informed merges (statistics from `loramerge calibrate` or the recipe's `data:`) and LiNeS.
    _builtin(
        "data", "regmean", "RegMeanConfig",
        name="regmean", kind="factored", exact=True, data="gram",
        paper="Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023)",
        url="https://arxiv.org/abs/2212.09849",
        summary="least-squares merge of each layer's outputs on calibration inputs; exact factored, rank sum r_t",
    ),
    _builtin(
        "data", "regmean_plus", "RegMeanConfig",
        name="regmean_plus", aliases=("regmean++",), kind="factored", exact=True, data="model",
        paper="RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging "
              "(Dang et al., 2025)",
        url="https://arxiv.org/abs/2508.03121",
        summary="RegMean with each block's statistics from the partially merged model; needs data and the base model",
    ),
    _builtin(
        "data", "fisher", "FisherConfig",
        name="fisher", kind="elementwise", exact=False, data="fisher",
        paper="Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022)",
        url="https://arxiv.org/abs/2111.09832",
        summary="element-wise Fisher-weighted average (Kronecker-factored diagonal Fisher); rank policy",
    ),
    _builtin(
        "lines", "lines", "LinesConfig", prepare="lines_prepare",
        name="lines", kind="factored", exact=True,
        paper="LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging "
              "(Wang et al., ICLR 2025)",
        url="https://arxiv.org/abs/2410.17146",
        summary="task arithmetic with the delta scaled linearly with depth; also `post: lines` after any method",
    ),
)


def with_factorwise(method: MergeMethod) -> MergeMethod:
    """The entry with its PEFT factor-wise variant attached, for the methods that have one."""
    from dataclasses import replace

    if method.name not in FACTORWISE_METHODS:
        return method
    return replace(method, factorwise=Ref("loramerge.merging.methods.factorwise:factorwise", method.name))


__all__ = ["BUILTIN_METHODS", "FACTORWISE_METHODS", "with_factorwise"]
