"""Demo tasks with generated data and trained LoRA adapters for SmolLM2: the task registry,
the committed data splits and adapters, and their length statistics.

Training (`inlaid_ray.demo.train`) and evaluation (`inlaid_ray.demo.evaluate`) import torch,
transformers and peft, so they are not re-exported here.
"""

from inlaid_ray.demo.data import SPLIT_SIZES, length_stats, load_examples, task_length_stats
from inlaid_ray.demo.paths import ADAPTERS_DIR, DATA_DIR, RESULTS_DIR, demo_adapter_dir, demo_data_path
from inlaid_ray.demo.task_base import SPLITS, DemoTask
from inlaid_ray.demo.tasks import DEMO_TASKS, get_task

__all__ = [
    "ADAPTERS_DIR",
    "DATA_DIR",
    "DEMO_TASKS",
    "RESULTS_DIR",
    "SPLITS",
    "SPLIT_SIZES",
    "DemoTask",
    "demo_adapter_dir",
    "demo_data_path",
    "get_task",
    "length_stats",
    "load_examples",
    "task_length_stats",
]
