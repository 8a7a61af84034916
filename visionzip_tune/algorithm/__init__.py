"""The algorithm, knowing no model: VisionZip as pure tensor functions (:mod:`.compress`) and the capture of one
vision-tower layer that feeds them (:mod:`.capture`)."""
