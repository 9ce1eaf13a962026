"""A trained model deployed: the SavedModel that adapts, and a task read from image folders."""
