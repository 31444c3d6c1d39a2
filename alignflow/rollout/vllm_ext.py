"""vLLM worker extension: load a checkpoint directory's weights into the running engine (RECIPES.md §8).

Runs INSIDE vLLM's worker process (.venv-vllm), so it imports only what that environment has (torch, safetensors)
and nothing of alignflow. vllm_worker.py passes it as `worker_extension_cls="vllm_ext.WeightSync"` with this folder
on the path; vLLM mixes the class into its Worker, which is where `self.reload_weights` comes from.

Why not `model.load_weights(...)`: on CPU vLLM repacks linear weights into oneDNN kernels at load time and leaves
`layer.weight` empty, so only the worker's `reload_weights` (restore, load, repack) works. Why an iterator rather
than `reload_weights(weights_path=...)`: with tied embeddings the checkpoint has no `lm_head.weight` and the path
form silently keeps the old output head; here the tied head is filled in from the embedding.
"""
import os


class WeightSync:
    def load_from_dir(self, model_dir: str) -> int:
        """Reload every tensor of `model_dir`/*.safetensors into the model; returns how many were loaded."""
        from safetensors.torch import load_file
        state = {}
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(model_dir, name)))
        if not state:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}")
        if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied embeddings
        self.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
