# align package
