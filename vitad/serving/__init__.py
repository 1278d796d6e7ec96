"""Serving fitted detectors: the models the score stage writes (:mod:`.model`, threshold from
:mod:`.calibration`), scoring new images with them (:mod:`.detector`), the ``vitad predict``
command (:mod:`.predict`) and the web demo's logic (:mod:`.demo`)."""
