"""The machine the method runs on: what its devices can do and how its cores are shared out."""
