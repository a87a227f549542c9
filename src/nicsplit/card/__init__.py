"""The offload card (an emulated SmartNIC/DPU): hidden volume, transports from
the splitter, and the pipeline that ships captured writes to the appliance."""
