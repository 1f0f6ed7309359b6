"""Evaluation with lm-eval: the merged model (and its sources as baselines) through a served
endpoint, vLLM in-process or transformers (`lm_eval`); `lm_eval_many` runs several models in
one lm-eval process. Results land in the model's `eval/` folder, where the card reads them.

May import `serve` (to start a server and run the parity check), `card.eval_results` (the
results format), `recipe`, `errors`, `settings` and `progress`.
"""

from .lm_eval import EvalModel, evaluate, evaluate_for_run, select_tasks

__all__ = ["EvalModel", "evaluate", "evaluate_for_run", "select_tasks"]
