"""Worker of test_two_processes.py: run under ``torchrun --standalone --nproc_per_node 2``; rank 0 writes JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 2 _two_process_worker.py MODEL_DIR OUT {trl,cipo}
"""

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository root

from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from cipo.integrations.trl import CipoGRPOTrainer  # noqa: E402
from tests.integrations.trl._helpers import run_grpo  # noqa: E402


def main() -> None:
    model_dir, out, which = sys.argv[1:4]
    torch.set_num_threads(1)
    data = Dataset.from_list([{"prompt": f"What is {i}+{3 * i}?"} for i in range(16)])
    cls, kwargs = (GRPOTrainer, {}) if which == "trl" else (CipoGRPOTrainer, {"cipo_loss": True})
    record = run_grpo(cls, model_dir, data, out, trainer_kwargs=kwargs, loss_type="dapo",
                      gradient_accumulation_steps=2, num_iterations=2, per_device_train_batch_size=2,
                      num_generations=4, max_steps=2)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out + ".json", "w") as f:
            json.dump({"world_size": int(os.environ["WORLD_SIZE"]), "losses": record.losses,
                       "grad_norms": record.grad_norms, "completions": record.completions,
                       "params": {k: v.tolist() for k, v in record.params.items()}}, f)


if __name__ == "__main__":
    main()
