"""A trained model outside training: loading final_model.pt or a checkpoint folder, embedding images with it,
the ONNX export, and the logged MLflow Model's code."""
