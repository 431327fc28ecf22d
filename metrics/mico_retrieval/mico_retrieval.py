"""`evaluate` metric wrapping `modeling_mico.retrieval.retrieval_metrics` (cross-modal retrieval R@k, MedR, MeanR).

Load it from the repository root with ``evaluate.load("metrics/mico_retrieval")`` (works offline). Each example is one
text query: its row of the text/item similarity matrix and the index of its item, so scores can also be accumulated
with ``add_batch``.
"""

import datasets
import evaluate
import numpy as np

from modeling_mico.retrieval import retrieval_metrics


_DESCRIPTION = """\
Cross-modal retrieval metrics as computed by the MiCo / VAST evaluation, correct with several captions per item:
Recall@k (percent), median and mean rank (1-based) for text->item and item->text retrieval. An item query is a hit
when any of its captions is retrieved. Ties are pessimistic: a competitor with the same score as the correct answer
counts as ranked ahead, so a constant similarity matrix scores chance level.
"""

_KWARGS_DESCRIPTION = """
Args:
    similarity (`list[list[float]]`): one row per text, one column per item (num_texts x num_items).
    text_to_item (`list[int]`): item index of each text; every item needs at least one text.
    prefix (`str`, defaults to `"t2v"`): name of the text->item direction; the reverse ("v2t") is derived.
    ks (`tuple[int]`, defaults to `(1, 5, 10)`): recall cut-offs.
Returns:
    `dict[str, float]`: e.g. `{"t2v/R@1": ..., "t2v/R@5": ..., "t2v/R@10": ..., "t2v/MedR": ..., "t2v/MeanR": ...,
    "v2t/R@1": ..., ...}`.
Examples:
    >>> metric = evaluate.load("metrics/mico_retrieval")
    >>> metric.compute(similarity=[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], text_to_item=[0, 1, 1], ks=(1,))["t2v/R@1"]
    66.66666666666666
"""

_CITATION = """\
@article{zhang2024mico,
  title={Explore the Limits of Omni-modal Pretraining at Scale},
  author={Zhang, Yiyuan and Li, Handong and Liu, Jing and Yue, Xiangyu},
  journal={arXiv preprint arXiv:2406.09412},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MicoRetrieval(evaluate.Metric):
    """Text<->item retrieval metrics from a similarity matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"similarity": datasets.Sequence(datasets.Value("float64")), "text_to_item": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2406.09412"],
        )

    def _compute(self, similarity, text_to_item, prefix: str = "t2v", ks=(1, 5, 10)) -> dict[str, float]:
        return retrieval_metrics(np.asarray(similarity, dtype=np.float64), text_to_item, prefix=prefix, ks=ks)
