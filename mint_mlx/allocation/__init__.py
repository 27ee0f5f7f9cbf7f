"""From curves and a budget to a plan: the knapsack, the analysis-to-plan bridge, stock's price."""
