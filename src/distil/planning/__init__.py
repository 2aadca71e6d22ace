"""Planning before training: which student shape and teacher size a budget calls for (the
capacity-gap planner behind ``distil advise``)."""
