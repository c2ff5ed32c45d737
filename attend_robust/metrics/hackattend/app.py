"""Gradio widget of the hackattend metric when this folder is a Hugging Face Space.

The Hub runs this file. attend-robust never imports it.
"""

from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

# Load the script next to this file, so the Space works under any owner and Space name.
module = evaluate.load(str(Path(__file__).resolve().with_name("hackattend.py")))
launch_gradio_widget(module)
