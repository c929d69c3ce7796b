"""Block-pruned UNets (BK-SDM, LAPTOP-Diff): configs plus weight maps from the teacher."""
