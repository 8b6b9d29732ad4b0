from setr_lowmem.model.setr import SETR, build_setr, count_parameters

__all__ = ["SETR", "build_setr", "count_parameters"]
