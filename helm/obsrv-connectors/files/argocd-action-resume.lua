-- Argo CD resource action "resume" for obsrv.io/Connector: sets spec.state to Running.
obj.spec.state = "Running"
return obj
