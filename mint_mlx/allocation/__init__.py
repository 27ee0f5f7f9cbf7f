"""From curves and a budget to a plan: the objective and the knapsack, the exact bytes of the files
a plan writes, the analysis-to-plan bridge, stock's price."""
