"""Episodes and the data sets they are drawn from."""
