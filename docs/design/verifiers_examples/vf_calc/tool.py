"""The calculator's MCP tool server (vf.Toolset), launched by verifiers as `python -m vf_calc.tool`."""

import verifiers.v1 as vf


class CalcToolset(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None  # advertise the tool bare ("multiply"), not "calc_toolset_multiply"

    @vf.tool
    def multiply(self, a: int, b: int) -> str:
        """Multiply two integers and return the product."""
        return str(a * b)


if __name__ == "__main__":
    CalcToolset.run()
