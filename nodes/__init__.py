"""ComfyUI nodes (V3 API): thin front ends over ``quant_core``'s public API."""
