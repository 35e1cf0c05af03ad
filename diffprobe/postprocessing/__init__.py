"""Postprocessing of predicted label maps: what nnU-Net users expect after the argmax.

Two operations, each decided before any prediction is made, never per case:

* ``outside_body`` (plans.json ``postprocessing.outside_body``, on for CT by the planner): voxels
  outside the body (the crop's body mask with its in-plane holes filled) are background. The crop is
  a box around that body; what lies inside the box but outside the body (air, the table, the
  scanner's padding) can only carry false positives.
* ``largest_component`` (per class, ``postprocessing.json`` of each fold, decided by the fold's
  validation as nnU-Net decides it): all but the largest connected component of a class become
  background where that raised the class's validation Dice.
"""
