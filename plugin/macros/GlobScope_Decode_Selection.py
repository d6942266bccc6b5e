"""ParaView macro: decode the point selected on a GlobScope landscape into a model file (GlobScope Decode Point)
and show its loss beside the landscape's value there. Copy it to ~/.config/ParaView/Macros; the GlobScope plugin
must be loaded (Tools > Manage Plugins)."""
from paraview import simple

source = simple.GetActiveSource()
if source is None or source.GetSelectionInput(source.Port) is None:
    raise RuntimeError("GlobScope Decode Selection: select a point on the landscape first")
if not hasattr(simple, "GlobScopeDecodePoint"):  # the plugin was loaded after paraview.simple was imported
    simple._add_functions(vars(simple))
if not hasattr(simple, "GlobScopeDecodePoint"):
    raise RuntimeError("GlobScope Decode Selection: load plugin/GlobScopePlugin.py first (Tools > Manage Plugins)")
view = simple.GetActiveViewOrCreate("RenderView")
extract = simple.ExtractSelection(Input=source)
decoded = simple.GlobScopeDecodePoint(Input=extract)
decoded.UpdatePipeline()
text = simple.servermanager.Fetch(decoded).GetFieldData().GetAbstractArray("message")
label = simple.Text(registrationName="GlobScope decoded point",
                    Text=text.GetValue(0) if text is not None else "GlobScope Decode Point: no answer")
simple.Show(decoded, view)
simple.Show(label, view)
simple.Render(view)
